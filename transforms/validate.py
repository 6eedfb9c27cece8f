"""Validation steps: turn raw rows into contract-checked records, dead-lettering the rest."""
from __future__ import annotations

import datetime as dt
from typing import Iterable, Iterator

import apache_beam as beam

from mmfuse.transforms import contract
from mmfuse.transforms.deadletter import DEAD, dead_letter
from mmfuse.transforms.privacy import pseudonym

_OLDEST = dt.datetime.min.replace(tzinfo=dt.timezone.utc)


def _order(source: str) -> tuple[str, int]:
    """Sort key of ``file#row=N`` in file order (rows compared as numbers)."""
    file, _, row = source.rpartition("#row=")
    return file, int(row)


class ValidateCatalog(beam.PTransform):
    """``(source, row)`` -> items keyed by id, one per id; bad rows and duplicate ids go to ``dead``.

    Of several rows with one ``item_id`` the newest ``updated_at`` wins, and among equals the last in file
    order (appended rows are taken as corrections), so the choice does not depend on the runner.
    """

    STAGE = "catalog"

    def __init__(self, spec: contract.CatalogColumns):
        super().__init__()
        self._spec = spec

    def expand(self, rows: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        spec, stage = self._spec, self.STAGE

        def check(element: tuple[str, dict]) -> Iterator[tuple[str, dict] | beam.pvalue.TaggedOutput]:
            source, row = element
            try:
                item = contract.catalog_item(row, source.rpartition("#row=")[0], spec)
            except contract.Invalid as e:
                key = row.get(spec.item_id)
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                    stage, key if isinstance(key, str) else None, e.error, str(e), source))
                return
            item["source"] = source
            yield item["item_id"], item

        def keep_newest(element: tuple[str, Iterable[dict]]) -> Iterator[tuple[str, dict] | beam.pvalue.TaggedOutput]:
            item_id, copies = element
            copies = sorted(copies, key=lambda c: (c["updated_at"] or _OLDEST, _order(c["source"])))
            kept = copies[-1]
            for dropped in copies[:-1]:
                why = ("newest updated_at" if (kept["updated_at"] or _OLDEST) > (dropped["updated_at"] or _OLDEST)
                       else "same updated_at, the later row in file order wins")
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                    stage, item_id, "duplicate_item_id",
                    f"duplicate item_id {item_id!r}: kept the copy at {kept['source']} ({why}); this copy dropped",
                    dropped["source"]))
            yield item_id, kept

        checked = rows | "Check" >> beam.FlatMap(check).with_outputs(DEAD, main="ok")
        unique = (checked.ok
                  | "GroupById" >> beam.GroupByKey()
                  | "KeepNewest" >> beam.FlatMap(keep_newest).with_outputs(DEAD, main="ok"))
        dead = (checked[DEAD], unique[DEAD]) | "Dead" >> beam.Flatten()
        return unique.ok, dead


class ValidateInteractions(beam.PTransform):
    """``(source, row)`` -> interactions whose user, item and time are valid and whose item is in the catalog.

    Timestamps after the end of the run date are refused: they are clock errors, and taking them would
    make a rerun of an old date see the future. With ``pseudonym_key``, every user id (of events and of dead
    letters) is replaced by its pseudonym here, before anything is written.
    """

    STAGE = "interactions"

    def __init__(self, spec: contract.InteractionColumns, run_date: str, item_ids: beam.PCollection,
                 pseudonym_key: bytes | None = None):
        super().__init__()
        self._spec, self._item_ids, self._key = spec, item_ids, pseudonym_key
        self._not_after = dt.datetime.combine(dt.date.fromisoformat(run_date), dt.time.max, dt.timezone.utc)

    def expand(self, rows: beam.PCollection) -> tuple[beam.PCollection, beam.PCollection]:
        spec, stage, not_after, key = self._spec, self.STAGE, self._not_after, self._key

        def check(element: tuple[str, dict]) -> Iterator[tuple[str, tuple[str, dict]] | beam.pvalue.TaggedOutput]:
            source, row = element
            try:
                event = contract.interaction(row, spec, not_after)
            except contract.Invalid as e:
                user, message = row.get(spec.user_id), str(e)
                user = str(user) if isinstance(user, (str, int)) and not isinstance(user, bool) else None
                if key is not None and user is not None:
                    hidden = pseudonym(key, user)
                    message, user = message.replace(repr(row.get(spec.user_id)), hidden).replace(user, hidden), hidden
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(stage, user, e.error, message, source))
                return
            if key is not None:
                event["user_id"] = pseudonym(key, event["user_id"])
            yield event["item_id"], (source, event)

        def join(element: tuple[str, dict]) -> Iterator[dict | beam.pvalue.TaggedOutput]:
            item_id, grouped = element
            for source, event in grouped["events"]:
                if grouped["items"]:
                    yield event
                else:
                    yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
                        stage, event["user_id"], "unknown_item",
                        f"item_id {item_id!r} is not in the catalog (or its catalog row was dead-lettered)",
                        source))

        checked = rows | "Check" >> beam.FlatMap(check).with_outputs(DEAD, main="ok")
        known = self._item_ids | "MarkKnown" >> beam.Map(lambda item_id: (item_id, True))
        joined = ({"events": checked.ok, "items": known}
                  | "JoinCatalog" >> beam.CoGroupByKey()
                  | "KeepKnown" >> beam.FlatMap(join).with_outputs(DEAD, main="ok"))
        dead = (checked[DEAD], joined[DEAD]) | "Dead" >> beam.Flatten()
        return joined.ok, dead
