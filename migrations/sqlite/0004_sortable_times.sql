-- Times are written with a fixed six-digit fraction (2026-12-05T23:48:58.416000Z), so that as
-- text they sort in time order; before, whole milliseconds were written `.416Z`, which sorts
-- after `.416123Z`. `reconciler_sortable_times` is the migration runner's own function: it
-- rewrites the times of a stored task or event (its own fields, never metadata) and leaves
-- everything else as it was.
UPDATE tasks SET data = reconciler_sortable_times(data);

-- Events are stored without their `seq`: a backend learns a batch's seqs only as it writes
-- them (PostgreSQL numbers them last, before COMMIT), so `seq` is put in front when served.
-- Every body starts `{"seq":N,`; the first comma ends that member.
UPDATE events SET body = reconciler_sortable_times('{' || substr(body, instr(body, ',') + 1))
WHERE body LIKE '{"seq":%';
