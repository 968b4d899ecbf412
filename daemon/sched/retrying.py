"""One build, attempt after attempt: a slot from the scheduler, the attempt, its record in
the history, and the retry policy's word on what follows a failure.

Whoever waits for the build (its dependents, other clients) goes on waiting while a retry
is pending: the build is finished only when it succeeds or the policy gives up.  They hear
of each retry (`Retried`) and of the policy giving up (`Failed`) as the build's progress.

An evicted attempt (`Cause.EVICTED`: killed under memory pressure, its durable directories
kept) is recorded, told as a note, and followed by another once the scheduler lets it in
again: no failure, so neither the policy nor the retry budget hears of it.
"""

import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from daemon.build import events
from daemon.proc.workers import Workers
from daemon.sched.admission import Limits
from daemon.sched.retry import Cause, Failed, RetrySettings, classify, decide
from daemon.sched.scheduler import Running, Scheduler
from store.history import AttemptRecord, History


@dataclass(frozen=True)
class Failure:
    cause: Cause
    message: str
    exit_code: int | None = None
    # Killed by a signal weft did not send (an exit code of -N).
    signalled: bool = False
    kept: str | None = None  # where the attempt's build dir was handed over (--keep-failed)


@dataclass
class Outcome:
    attempts: int = 0
    flaky: bool = False
    failure: Failure | None = None


# Runs one attempt in the slot it got, with the timeouts given; None on success.
Attempt = Callable[[Running, float, float], Awaitable[Failure | None]]
Tell = Callable[[events.Event], Awaitable[None]]


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


class RetryRunner:
    def __init__(
        self,
        scheduler: Scheduler,
        history: History,
        limits: Limits,
        settings: RetrySettings,
        workers: Workers,
    ) -> None:
        self.workers = workers
        self.scheduler = scheduler
        self.history = history
        self.limits = limits
        self.settings = settings

    def allowed(self, requested: int | None, env: dict[str, str]) -> tuple[int, bool]:
        """Retries allowed for a build, and whether the user asked for them explicitly."""
        if requested is not None:
            return requested, requested > 0
        own = env.get("retries", "").strip()
        if own.isdigit():
            return int(own), int(own) > 0
        return self.settings.retries, False

    async def run(
        self,
        drv: str,
        env: dict[str, str],
        requested: int | None,
        timeouts: tuple[float, float],
        attempt: Attempt,
        tell: Tell,
    ) -> Outcome:
        allowed, explicit = self.allowed(requested, env)
        outcome = Outcome()
        failures: list[Failed] = []
        kept: list[str] = []  # the earlier attempts' build dirs handed over
        cap: int | None = None
        factor = 1.0
        evicted = False
        while True:
            outcome.attempts += 1
            n = outcome.attempts
            async with self.scheduler.slot(drv, n, cap, evicted) as run:
                failure = await attempt(run, timeouts[0] * factor, timeouts[1] * factor)
            if failure is not None:
                failure = dataclasses.replace(
                    failure,
                    cause=classify(
                        failure.cause,
                        failure.signalled,
                        run.load_peak.oom_kills > run.load_start.oom_kills,
                    ),
                )
            # An attempt that found its outputs already there ran nothing: not history.
            if run.spawned or failure is not None:
                # With other builds' records and logs, in one trip and one transaction;
                # waiting for theirs while others run.
                record, others = _record(run, failure), self.scheduler.others_running(run)
                outcome.flaky = await self.workers.batched(self.history.record_many, record, others)
            if failure is None:
                outcome.flaky = outcome.flaky or bool(failures)
                return outcome
            evicted = failure.cause is Cause.EVICTED
            if evicted:
                await tell(events.Note(failure.message, drv))
                continue
            # Other builds running alongside are load too, whatever the pressure said.
            loaded = self.limits.loaded(run.load_peak) or run.parallelism > 1
            failures.append(Failed(failure.cause, loaded, run.parallelism, failure.exit_code))
            marked = _flag(env.get("noRetry"))
            known = await trio.to_thread.run_sync(self.history.is_flaky, drv)
            decision = decide(failures, allowed, explicit, marked, known, self.settings)
            if not decision.retry:
                outcome.failure = _naming_kept(failure, kept)
                # Always told: a status line counts the build as running until it hears.
                # The policy's reason only where retrying was in question.
                await tell(
                    events.Failed(drv, decision.why if len(failures) > 1 or allowed > 0 else "")
                )
                return outcome
            if failure.kept is not None:
                kept.append(failure.kept)
            # Evictions are attempts too, beside the budget's.
            most = allowed + 1 + n - len(failures)
            retry = events.Retried(drv, n + 1, most, decision.delay, decision.cap, decision.why)
            await tell(retry)
            await trio.sleep(decision.delay)
            cap, factor = decision.cap, decision.timeout_factor


def _naming_kept(failure: Failure, earlier: list[str]) -> Failure:
    """The last attempt's failure, which names its own kept build dir, naming the
    earlier attempts' too: each attempt's dir is handed over, and the user hears only
    this message."""
    if not earlier:
        return failure
    dirs = ", ".join(earlier)
    return dataclasses.replace(
        failure, message=f"{failure.message}\nthe earlier attempts' build dirs are kept at {dirs}"
    )


def _record(run: Running, failure: Failure | None) -> AttemptRecord:
    return AttemptRecord(
        drv=run.drv,
        attempt=run.attempt,
        start_time=run.started,
        end_time=run.ended,
        outcome="built" if failure is None else str(failure.cause),
        exit_code=failure.exit_code if failure is not None else 0,
        load_start=run.load_start.as_dict(),
        load_peak=run.load_peak.as_dict(),
        parallelism=run.parallelism,
        paused=round(run.paused_total, 3),
        snapshot=run.snapshot,
    )
