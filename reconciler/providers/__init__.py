"""Provider adapters by name. Adding a provider means one new module and one line here."""

from __future__ import annotations

from reconciler.providers.acedata import AceData
from reconciler.providers.base import PollFlow, PollResult, Provider, RawDelivery
from reconciler.providers.cometapi import CometAPI
from reconciler.providers.gateway import Gateway
from reconciler.providers.kie import Kie
from reconciler.providers.kling import Kling

PROVIDERS: dict[str, type[Provider]] = {
    "kling": Kling,
    "cometapi": CometAPI,
    "gateway": Gateway,
    "acedata": AceData,
    "kie": Kie,
}

__all__ = ["PROVIDERS", "PollFlow", "PollResult", "Provider", "RawDelivery"]
