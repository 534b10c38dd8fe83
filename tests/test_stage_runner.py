"""data_tools.stage.run_stage for the stages that run a model in their own process (generate, encode): records
split into parts journaled one by one, a Reject of a whole record or of one part, decoding ahead in threads, a sink
instead of the manifest, and a re-run that skips what is done. The processes here are plain functions."""

import pytest

from data_tools.stage import Reject, read_journal, read_jsonl, run_stage

RECORDS = [{"id": "a", "path": "/v/a.mp4"}, {"id": "bad", "path": "/v/bad.mp4"}, {"id": "c", "path": "/v/c.mp4"}]


def _parts(record):
    return [f"{record['id']}.{j}" for j in range(3)]


def test_parts_are_journaled_one_by_one_and_a_rerun_makes_only_the_rest(tmp_path):
    made, kill = [], [True]

    def videos(record, ids):
        if record["id"] == "bad":
            raise Reject("no prompt")

        def make(part):
            made.append(part)
            if part == "c.1":
                raise Reject("latents not finite")
            if part == "c.2" and kill and kill.pop():
                raise KeyboardInterrupt  # killed while making c.2
            return {"id": part, "gt_id": record["id"]}
        return [(part, lambda part=part: make(part)) for part in ids]

    with pytest.raises(KeyboardInterrupt):
        run_stage("gen", RECORDS, videos, tmp_path, in_process=True, parts=_parts)
    assert [e["id"] for e in read_journal(tmp_path / "journal.jsonl")] == ["a.0", "a.1", "a.2", "bad", "c.0", "c.1"]
    assert not (tmp_path / "manifest.jsonl").exists()
    summary = run_stage("gen", RECORDS, videos, tmp_path, in_process=True, parts=_parts)
    assert made == ["a.0", "a.1", "a.2", "c.0", "c.1", "c.2", "c.2"]  # only c.2 made again
    assert summary == {"stage": "gen", "shard": "0/1", "inputs": 3, "accepted": 5, "rejected": 2, "already_done": 5}
    assert [r["id"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["a.0", "a.1", "a.2", "c.0", "c.2"]
    assert [(r["id"], r["path"], r["reason"], r["stage"]) for r in read_jsonl(tmp_path / "rejects.jsonl")] == [
        ("bad", "/v/bad.mp4", "no prompt", "gen"), ("c.1", "/v/c.mp4", "latents not finite", "gen")]


class _Sink:
    def __init__(self, done=()):
        self.done, self.pending, self.published = set(done), {}, []

    def add(self, key, output):
        self.pending[key] = output

    def close(self):
        self.published += list(self.pending.items())
        self.done |= self.pending.keys()
        self.pending = {}


def test_a_sink_takes_the_outputs_and_decoding_runs_ahead(tmp_path):
    def decode(record):
        if record["id"] == "bad":
            raise Reject("cannot decode")
        return record["id"].upper()

    def encode(record, frames):
        return {"latent": frames}

    sink = _Sink(done={"a"})  # published by an earlier run
    summary = run_stage("enc", RECORDS, encode, tmp_path, workers=2, in_process=True, prefetch=decode, sink=sink,
                        suffix=".0-of-1")
    assert sink.published == [("c", {"latent": "C"})] and sink.done == {"a", "c"}
    assert summary == {"stage": "enc", "shard": "0/1", "inputs": 3, "accepted": 2, "rejected": 1, "already_done": 1}
    assert [e["id"] for e in read_journal(tmp_path / "journal.0-of-1.jsonl")] == ["bad"]  # the rejects only
    assert [r["id"] for r in read_jsonl(tmp_path / "rejects.0-of-1.jsonl")] == ["bad"]
    assert not list(tmp_path.glob("manifest*"))
    again = run_stage("enc", RECORDS, encode, tmp_path, in_process=True, prefetch=decode, sink=_Sink({"a", "c"}),
                      suffix=".0-of-1")
    assert again["already_done"] == 3 and again["rejected"] == 1


def test_an_error_that_is_not_a_reject_stops_an_in_process_stage(tmp_path):
    def broken(record):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run_stage("gen", RECORDS, broken, tmp_path, in_process=True)
    with pytest.raises(ValueError, match="in this process"):
        run_stage("gen", RECORDS, broken, tmp_path, parts=_parts)
