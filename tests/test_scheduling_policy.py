"""The scheduling and retry policy cores, without a daemon: load files, admission, retries."""

import dataclasses
from pathlib import Path

from daemon.sched.admission import Admission, Limits
from daemon.sched.loadsignals import IDLE, ProcReader, peak
from daemon.sched.retry import Cause, Failed, RetrySettings, classify, decide
from daemon.settings import Settings


def limits(**changed: float) -> Limits:
    """The default limits, `changed` as given."""
    return dataclasses.replace(Limits.from_settings(Settings()), **changed)


def write_proc(root: Path, cpu: str, memory: str = "", io: str = "") -> None:
    (root / "pressure").mkdir(parents=True, exist_ok=True)
    for name, text in (("cpu", cpu), ("memory", memory), ("io", io)):
        if text:
            (root / "pressure" / name).write_text(text)
    (root / "loadavg").write_text("1.50 0.75 0.25 2/100 999\n")
    (root / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    (root / "vmstat").write_text("nr_free_pages 1\noom_kill 3\n")


def test_proc_reader_rates_from_totals_and_avg10_without(tmp_path: Path, monkeypatch) -> None:
    line = "some avg10=12.50 avg60=1.00 avg300=0.00 total={}\nfull avg10=0.00 total=0\n"
    write_proc(tmp_path, line.format(0), "some avg10=33.00 avg60=0 avg300=0\n")
    reader = ProcReader(str(tmp_path))
    clock = iter([100.0, 101.0])
    monkeypatch.setattr("daemon.sched.loadsignals.time.monotonic", lambda: next(clock))
    first = reader.sample()
    assert first.cpu == 12.5  # no earlier total yet: the kernel's average
    assert first.memory == 33.0 and first.io is None
    assert (first.load1, first.load5, first.mem_available, first.oom_kills) == (
        1.5,
        0.75,
        2048 * 1024,
        3,
    )
    # 0.4 s of stall in 1 s: 40 %, however slowly avg10 follows.
    (tmp_path / "pressure" / "cpu").write_text(line.format(400_000))
    assert reader.sample().cpu == 40.0


def test_no_pressure_files_is_no_pressure(tmp_path: Path) -> None:
    sample = ProcReader(str(tmp_path)).sample()
    assert sample.cpu is None and sample.memory is None and sample.load1 == 0.0
    assert not limits().over(sample)


def test_admission_backs_off_under_pressure_and_recovers_with_hysteresis() -> None:
    adm = Admission(limits(cpu=60.0, resume_fraction=0.5), max_jobs=4)
    hot, warm, cool = (IDLE.__class__(0, c, 0, 0, 0, 0, 0, 0) for c in (80.0, 45.0, 10.0))
    adm.on_sample(hot, running=4)
    assert adm.limit == 3 and adm.held_back == ["cpu pressure 80% > 60%"]
    adm.on_sample(hot, running=4)
    assert adm.limit == 2
    adm.on_sample(hot, running=1)
    assert adm.limit == 1
    assert adm.may_start(0, [], None, False)  # one build may always run
    assert not adm.may_start(1, [], None, False)
    # Under the limit but over the resume mark: held, not raised (no oscillation).
    adm.on_sample(warm, running=1)
    assert adm.limit == 1
    for want in (2, 3, 4, 4):
        adm.on_sample(cool, running=1)
        assert adm.limit == want
    assert adm.held_back == []


def test_retries_go_first_and_cap_parallelism() -> None:
    adm = Admission(limits(), max_jobs=4)
    assert adm.may_start(2, [], None, retry_waiting=False)
    assert not adm.may_start(2, [], None, retry_waiting=True)  # a retry waits to drain
    assert not adm.may_start(2, [], cap=2, retry_waiting=True)
    assert adm.may_start(1, [], cap=2, retry_waiting=True)
    assert not adm.may_start(2, [2], None, retry_waiting=False)  # a running retry caps


def test_pause_and_resume_follow_memory_pressure() -> None:
    adm = Admission(limits(pause_memory=50.0, resume_fraction=0.5), max_jobs=4)
    high, mid, low = (IDLE.__class__(0, 0, m, 0, 0, 0, 0, 0) for m in (70.0, 40.0, 10.0))
    assert adm.to_pause(high, unpaused=2)
    assert not adm.to_pause(high, unpaused=1)  # one build always runs
    assert not adm.to_resume(mid, unpaused=1)
    assert adm.to_resume(low, unpaused=1)
    assert adm.to_resume(high, unpaused=0)


S = RetrySettings(retries=2, backoff=1.0, timeout_factor=2.0)


def test_deterministic_failures_are_never_retried() -> None:
    for cause in (Cause.HASH_MISMATCH, Cause.MISSING_OUTPUT):
        d = decide([Failed(cause, True, 4)], 5, True, False, True, S)
        assert not d.retry and "deterministic" in d.why
    assert not decide([Failed(Cause.EXIT, True, 4)], 2, False, True, False, S).retry
    low = decide([Failed(Cause.EXIT, False, 4)], 2, False, False, False, S)
    assert not low.retry and low.why == "failed at low load"
    assert not decide([Failed(Cause.EXIT, True, 4)], 0, False, False, False, S).retry


def test_load_failures_retry_with_less_contention_and_backoff() -> None:
    first = Failed(Cause.EXIT, True, 4)
    d = decide([first], 2, False, False, False, S)
    assert (d.retry, d.cap, d.delay, d.timeout_factor) == (True, 2, 1.0, 2.0)
    second = Failed(Cause.TIMEOUT, True, 2)
    d = decide([first, second], 2, False, False, False, S)
    assert (d.retry, d.cap, d.delay, d.timeout_factor) == (True, 1, 2.0, 4.0)
    assert not decide([first, second, Failed(Cause.EXIT, True, 1)], 2, False, False, False, S).retry
    assert decide([Failed(Cause.OOM, False, 3)], 2, False, False, False, S).retry


def test_known_flaky_gets_one_chance_at_low_load() -> None:
    once = [Failed(Cause.EXIT, False, 1)]
    assert decide(once, 2, False, False, True, S).retry
    # The failure repeats at low load: deterministic after all.
    assert not decide([*once, Failed(Cause.EXIT, False, 1)], 2, False, False, True, S).retry
    # A failure under load, then a different one at low load: one more chance, not two.
    loaded_then_low = [Failed(Cause.TIMEOUT, True, 2, -9), Failed(Cause.EXIT, False, 1, 1)]
    assert decide(loaded_then_low, 3, False, False, False, S).retry
    assert not decide(
        [*loaded_then_low, Failed(Cause.EXIT, False, 1, 1)], 3, False, False, False, S
    ).retry


def test_a_failure_repeated_exactly_at_low_load_is_deterministic_even_after_load() -> None:
    loaded, low = Failed(Cause.EXIT, True, 2, 1), Failed(Cause.EXIT, False, 1, 1)
    d = decide([loaded, low], 3, False, False, True, S)
    assert not d.retry and d.why == "failed the same way again, at low load"
    # Repeated under load, it may still be the load's doing.
    assert decide([loaded, loaded], 3, False, False, False, S).retry
    # A user who asked for retries gets them.
    assert decide([loaded, low], 3, True, False, False, S).retry


def test_exit_codes_126_and_127_are_deterministic_whatever_the_load_or_the_request() -> None:
    for code in (126, 127):
        for explicit, known_flaky in ((False, False), (True, True)):
            d = decide([Failed(Cause.EXIT, True, 4, code)], 3, explicit, False, known_flaky, S)
            assert not d.retry and f"exit code {code}" in d.why and "deterministic" in d.why
    # Another exit code under load is still retried.
    assert decide([Failed(Cause.EXIT, True, 4, 1)], 3, False, False, False, S).retry


def test_explicit_retries_retry_everything_but_deterministic_failures() -> None:
    low = [Failed(Cause.EXIT, False, 3)]
    assert decide(low, 3, True, True, False, S).retry
    assert decide([Failed(Cause.SETUP, False, 1)], 3, True, False, False, S).retry
    assert not decide([Failed(Cause.SETUP, False, 1)], 3, False, False, False, S).retry
    four = [Failed(Cause.EXIT, False, 1)] * 4
    assert not decide(four, 3, True, False, False, S).retry


def test_classify_signals() -> None:
    assert classify(Cause.EXIT, True, True) is Cause.OOM
    assert classify(Cause.EXIT, True, False) is Cause.SIGNAL
    assert classify(Cause.TIMEOUT, True, True) is Cause.TIMEOUT


def test_peak_and_settings() -> None:
    a = IDLE.__class__(1, 10.0, None, 5.0, 1.0, 1.0, 100, 1)
    b = IDLE.__class__(2, 5.0, 20.0, None, 2.0, 0.5, 50, 2)
    p = peak(a, b)
    assert (p.cpu, p.memory, p.io, p.load1, p.mem_available, p.oom_kills) == (
        10.0,
        20.0,
        5.0,
        2.0,
        50,
        2,
    )
    s = Settings.from_toml("max-cpu-pressure = 40\nretries = 3\nmin-free-memory-mib = 1")
    limits = Limits.from_settings(s, 2)
    assert limits.cpu == 40.0 and limits.min_available == 1 << 20
    assert RetrySettings.from_settings(s).retries == 3


def test_the_real_proc() -> None:
    reader = ProcReader()
    first, second = reader.sample(), reader.sample()
    assert second.mem_available > 0 and second.load1 >= 0
    if Path("/proc/pressure/cpu").exists():
        assert first.cpu is not None and 0.0 <= second.cpu <= 100.0  # type: ignore[operator]
