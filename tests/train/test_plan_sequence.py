"""The longest-sequence search of ``jaxbatch plan --max-seq-len``."""

import json
from pathlib import Path

import jax
import pytest

from jaxbatch.train import cli, plan_sequence
from jaxbatch.train import config as config_lib

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LM = str(CONFIGS / "stdlib_lm.py") + ":runlocal"


def lm_config(*overrides: str):
    return config_lib.load_config(LM, ["mesh.data=1", *overrides])


def quadratic_memory(calls):
    """A stand-in memory model, peak = 1000 + 3·L + L²/8 bytes, recording the lengths asked."""

    def measure(cfg, seq_len):
        assert cfg.dataset.options.seq_len == 32  # the search never mutates the config it got
        calls.append(seq_len)
        peak = 1000 + 3 * seq_len + seq_len**2 // 8
        return plan_sequence.SequenceProbe(seq_len, peak, peak - 1000)

    return measure


@pytest.mark.parametrize("budget", [1_000 + 3 * 96 + 96**2 // 8, 50_000, 2_000_000])
def test_bisection_finds_the_largest_fitting_multiple(budget):
    calls = []
    search = plan_sequence.longest_fitting_sequence(
        lm_config(), budget, multiple=16, limit=1 << 14, measure=quadratic_memory(calls)
    )
    fitting = [n for n in range(16, (1 << 14) + 1, 16) if 1000 + 3 * n + n**2 // 8 <= budget]
    assert search.longest == max(fitting)
    assert not search.reached_limit
    assert search.probe(search.longest).fits(budget)
    assert not search.probe(search.longest + 16).fits(budget)  # the neighbour was compiled
    # doubling then bisection: O(log(limit / multiple)) compiles, not a scan over lengths
    assert len(calls) == len(set(calls)) <= 2 * 10 + 1


@pytest.mark.parametrize("budget", [1_000 + 3 * 96 + 96**2 // 8, 50_000, 2_000_000, 100])
def test_affine_guess_finds_the_same_answer_in_fewer_compiles(budget):
    # The stand-in memory is quadratic: the line through two probes is only a guess, and the
    # gallop + bisection still lands on the largest fitting multiple.
    kw = dict(multiple=16, limit=1 << 14)
    want = plan_sequence.longest_fitting_sequence(
        lm_config(), budget, **kw, measure=quadratic_memory([])
    )
    calls = []
    got = plan_sequence.longest_fitting_sequence(
        lm_config(), budget, **kw, measure=quadratic_memory(calls), affine_from=(2, 4)
    )
    assert got.longest == want.longest
    assert len(calls) == len(set(calls))  # no length compiled twice
    if got.longest is not None:
        assert not got.probe(got.longest + 16).fits(budget)  # the neighbour was compiled
    with pytest.raises(ValueError, match=r"affine_from=\(4, 2\): expected two unit counts"):
        plan_sequence.longest_fitting_sequence(
            lm_config(), budget, **kw, measure=quadratic_memory([]), affine_from=(4, 2)
        )


def test_affine_guess_of_an_affine_memory_takes_four_compiles():
    calls = []

    def affine(cfg, seq_len):
        calls.append(seq_len)
        return plan_sequence.SequenceProbe(seq_len, 5000 + 7 * seq_len, 7 * seq_len)

    search = plan_sequence.longest_fitting_sequence(
        lm_config(), 5000 + 7 * 1000, multiple=16, limit=1 << 14, measure=affine,
        affine_from=(1, 2),
    )  # fmt: skip
    assert search.longest == 992 and len(calls) == 4, calls  # 16, 32, then 992 and 1008


def test_bisection_reports_nothing_fits_and_the_limit():
    calls = []
    nothing = plan_sequence.longest_fitting_sequence(
        lm_config(), 100, multiple=16, limit=256, measure=quadratic_memory(calls)
    )
    assert nothing.longest is None and calls == [16]
    everything = plan_sequence.longest_fitting_sequence(
        lm_config(), 10**9, multiple=16, limit=256, measure=quadratic_memory([])
    )
    assert everything.longest == 256 and everything.reached_limit


def test_search_on_the_compiled_step_of_the_lm(capsys):
    """Budget = the compiled peak at 32 tokens: 32 fits, 64 does not (each length compiled once)."""
    cfg = lm_config("batch_size=4", "reference_batch_size=4", "eval_batch_size=4")
    devices = jax.devices()[:1]
    compiled = {}

    def measure(c, n):
        if n not in compiled:
            compiled[n] = plan_sequence.peak_bytes_at(c, n, devices=devices)
        return compiled[n]

    at_32, at_64 = measure(cfg, 32), measure(cfg, 64)
    assert at_64.peak_bytes > at_32.peak_bytes and at_64.temp_bytes > at_32.temp_bytes
    search = plan_sequence.longest_fitting_sequence(
        cfg, at_32.peak_bytes, multiple=32, limit=128, measure=measure
    )
    assert search.longest == 32 and [p.seq_len for p in search.probes] == [32, 64]
    print(plan_sequence.format_sequence_table({"full": search}))
    table = capsys.readouterr().out
    assert "full" in table and "32" in table.splitlines()[1]


def test_bad_requests_fail_before_compiling():
    with pytest.raises(ValueError, match="config.task='classification' is not one of"):
        plan_sequence.with_sequence_length(
            config_lib.load_config(str(CONFIGS / "digits_resnet_lars.py")), 64
        )
    with pytest.raises(ValueError, match="memory budget must be positive"):
        plan_sequence.longest_fitting_sequence(lm_config(), 0)


def test_cli_max_seq_len_errors_name_what_is_missing(capsys):
    base = ["plan", "--config", LM, "--devices", "8", "--max-seq-len"]
    assert cli.main(base) == 2
    assert "--max-seq-len needs --memory-budget" in capsys.readouterr().err
    assert cli.main([*base, "--memory-budget", "1GiB", "--batch-sizes", "1,2"]) == 2
    assert "separate searches" in capsys.readouterr().err


def test_cli_max_seq_len_prints_and_writes_the_search(tmp_path, capsys):
    out = tmp_path / "seq.json"
    args = ["plan", "--config", LM, "--devices", "8", "--memory-budget", "64MiB", "--max-seq-len"]
    args += ["--seq-multiple", "32", "--seq-limit", "32", "--json", str(out)]
    args += ["--config.mesh.data=8"]
    assert cli.main(args) == 0
    assert "longest seq" in capsys.readouterr().out
    got = json.loads(out.read_text())
    (mode,) = got.keys() - {"config", "overrides"}
    assert got[mode]["longest"] == 32 and got[mode]["reached_limit"]  # one compile: 32 fits
    assert got[mode]["probes"][0]["peak_bytes"] <= 64 * 2**20
