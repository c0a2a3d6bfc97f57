"""Structured-output benchmark (#19): the partial-JSON parser against re-parsing per delta.

    python benchmarks/structured_bench.py [--quick] [--budget SECONDS]

A realistic structured output, `{"items": [card, ...]}` (what the client asks for a
`list[Card]` output: json_schema wants an object on top), where a card has strings with
non-ASCII text and escapes, numbers, booleans, nulls and nested lists and objects, is
serialised by `json.dumps` to 10 KB, 100 KB and 1 MB and cut into deltas of 4 to 8
characters (random, seeded). Each consumer is fed every delta:

* `ours: feed`: `PartialJSON.feed()` + `completed_elements()` (what `stream.elements()` needs);
* `ours: feed+value`: the same, reading `.value` after each delta that changed it (what
  `stream.partials()` does: it hands out the live value, grown in place);
* `ours: +deepcopy`: the same plus `copy.deepcopy` of the value per change (the "snapshot
  per change" alternative to handing out the live value);
* `jiter trailing-strings`: the openai SDK's way: append the delta to the accumulated text,
  encode it and re-parse it whole with `jiter.from_json(..., partial_mode="trailing-strings")`
  (the mode that shows strings as they grow, as ours does);
* `jiter partial (openai)`: the same with `partial_mode=True`, the exact call of the openai
  SDK's `chat.completions.stream()` (hides a string until it closes);
* `ijson items_coro` (only if ijson is importable; it is no dependency of ours): a push
  parser in C (yajl2_c) that reports whole elements only, no partial values, for scale;
* `json.loads once`: decoding the final text once, for scale.

The re-parsing consumers are quadratic: each stops once it has spent `--budget` seconds
(default 20) of CPU on one size; the table then shows the CPU time per byte extrapolated
from the fraction it reached (time ~ fraction squared) and marks it `est.`.

Times are CPU seconds of this process (`time.process_time()`, which other processes on a
shared machine disturb less than the wall clock), median of the repetitions, as
nanoseconds per byte of the UTF-8 output. The Markdown table goes to stdout, progress to
stderr.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # the checkout's tokenhub_stream, installed or not
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

import jiter  # noqa: E402

from tokenhub_stream._partial_json import PartialJSON  # noqa: E402

SIZES = {"10 KB": 10_000, "100 KB": 100_000, "1 MB": 1_000_000}
QUICK_SIZES = {"10 KB": 10_000, "100 KB": 100_000}
REPEATS = {"10 KB": 15, "100 KB": 5, "1 MB": 3}

_WORDS = (
    "the a card list of and to stream model token value partial field schema object "
    "array number string parser delta linear time quadratic café naïve Zürich São Paulo "
    "東京 Москва 😀 ✓ fast slow good better best output"
).split()


def _sentence(rnd: random.Random, words: int) -> str:
    text = " ".join(rnd.choice(_WORDS) for _ in range(words))
    if rnd.random() < 0.2:
        text += ' "quoted"'
    if rnd.random() < 0.2:
        text += "\nsecond line\twith a tab"
    return text.capitalize() + "."


def _card(rnd: random.Random, n: int) -> dict[str, object]:
    return {
        "id": n,
        "title": _sentence(rnd, rnd.randint(2, 6)),
        "summary": _sentence(rnd, rnd.randint(15, 45)),
        "tags": [rnd.choice(_WORDS) for _ in range(rnd.randint(1, 5))],
        "score": round(rnd.uniform(0, 100), 3),
        "price": {"amount": round(rnd.uniform(1, 500), 2), "currency": "EUR"},
        "available": rnd.random() < 0.7,
        "rating": None if rnd.random() < 0.3 else rnd.randint(1, 5),
        "steps": [
            {"n": k + 1, "text": _sentence(rnd, rnd.randint(4, 12))}
            for k in range(rnd.randint(0, 4))
        ],
    }


def make_output(size: int, seed: int = 19) -> str:
    """A `{"items": [...]}` text of about `size` UTF-8 bytes (json.dumps' default style)."""
    rnd = random.Random(seed)
    cards: list[dict[str, object]] = []
    total = len('{"items": []}')
    while total < size:
        card = _card(rnd, len(cards) + 1)
        cards.append(card)
        total += len(json.dumps(card, ensure_ascii=False).encode()) + 2
    return json.dumps({"items": cards}, ensure_ascii=False)


def make_long_string(size: int, seed: int = 19) -> str:
    """`{"text": "..."}` whose one string value is about `size` bytes: the worst case of
    reading `.value` per delta (a str cannot grow in place, so each read joins it anew)."""
    rnd = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(_sentence(rnd, 20))
        total += len(parts[-1].encode()) + 1
    return json.dumps({"text": " ".join(parts)}, ensure_ascii=False)


def make_deltas(text: str, seed: int = 19) -> list[str]:
    rnd = random.Random(seed)
    deltas: list[str] = []
    i = 0
    while i < len(text):
        step = rnd.randint(4, 8)
        deltas.append(text[i : i + step])
        i += step
    return deltas


# --- consumers: each returns (CPU seconds, fraction of the deltas fed) -----------------------

Run = Callable[[list[str], float], tuple[float, float]]


def ours_feed(deltas: list[str], budget: float) -> tuple[float, float]:
    start = time.process_time()
    parser = PartialJSON(elements_at=("items",))
    count = 0
    for delta in deltas:
        parser.feed(delta)
        count += len(parser.completed_elements())
    parser.finish()
    return time.process_time() - start, 1.0


def ours_feed_value(deltas: list[str], budget: float) -> tuple[float, float]:
    start = time.process_time()
    parser = PartialJSON(elements_at=("items",))
    for k, delta in enumerate(deltas):
        if parser.feed(delta):
            parser.value  # noqa: B018 -- what a consumer of partials() reads
        parser.completed_elements()
        if k % 64 == 0 and time.process_time() - start > budget:
            return time.process_time() - start, (k + 1) / len(deltas)
    parser.finish()
    return time.process_time() - start, 1.0


def ours_deepcopy(deltas: list[str], budget: float) -> tuple[float, float]:
    start = time.process_time()
    parser = PartialJSON(elements_at=("items",))
    for k, delta in enumerate(deltas):
        if parser.feed(delta):
            copy.deepcopy(parser.value)
        parser.completed_elements()
        if k % 64 == 0 and time.process_time() - start > budget:
            return time.process_time() - start, (k + 1) / len(deltas)
    parser.finish()
    return time.process_time() - start, 1.0


def _jiter(mode: bool | str) -> Run:
    def run(deltas: list[str], budget: float) -> tuple[float, float]:
        start = time.process_time()
        text = ""
        for k, delta in enumerate(deltas):
            text += delta
            jiter.from_json(text.encode(), partial_mode=mode)  # type: ignore[arg-type]
            if k % 64 == 0 and time.process_time() - start > budget:
                return time.process_time() - start, (k + 1) / len(deltas)
        return time.process_time() - start, 1.0

    return run


def _ijson() -> Run | None:
    try:
        import ijson  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None

    def run(deltas: list[str], budget: float) -> tuple[float, float]:
        start = time.process_time()
        found = ijson.sendable_list()
        coro = ijson.items_coro(found, "items.item", use_float=True)
        for delta in deltas:
            coro.send(delta.encode())
            found.clear()
        coro.close()
        return time.process_time() - start, 1.0

    return run


def json_loads_once(deltas: list[str], budget: float) -> tuple[float, float]:
    text = "".join(deltas)  # not timed: the accumulated text, as a client would have it
    start = time.process_time()
    json.loads(text)
    return time.process_time() - start, 1.0


# --- driver ----------------------------------------------------------------------------------


def check(text: str, deltas: list[str]) -> None:
    """Every consumer must see the same value: a wrong parser would make a fast row."""
    expected = json.loads(text)
    parser = PartialJSON(elements_at=("items",))
    elements: list[object] = []
    for delta in deltas:
        parser.feed(delta)
        elements.extend(parser.completed_elements())
    assert parser.finish() == expected
    assert elements == expected.get("items", [])
    assert jiter.from_json(text.encode(), partial_mode="trailing-strings") == expected


def measure(run: Run, deltas: list[str], repeats: int, budget: float) -> tuple[float, bool]:
    """Median CPU seconds for all the deltas, and whether it is extrapolated."""
    times: list[float] = []
    estimated = False
    for _ in range(repeats):
        gc.collect()
        elapsed, fraction = run(deltas, budget)
        if fraction < 1.0:
            # Re-parsing the first fraction f of the text costs ~f^2 of the whole.
            times.append(elapsed / fraction**2)
            estimated = True
            break  # one capped run says enough; repeating it would only cost the budget again
        times.append(elapsed)
        if elapsed > budget:
            break
    return statistics.median(times), estimated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 KB and 100 KB, one repetition")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="CPU seconds per quadratic consumer and size"
    )
    args = parser.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    budget = 2.0 if args.quick else args.budget

    consumers: dict[str, Run] = {
        "ours: feed": ours_feed,
        "ours: feed+value": ours_feed_value,
        "ours: +deepcopy": ours_deepcopy,
        "jiter trailing-strings": _jiter("trailing-strings"),
        "jiter partial (openai)": _jiter(True),
    }
    ijson_run = _ijson()
    if ijson_run is not None:
        consumers["ijson items_coro"] = ijson_run
    consumers["json.loads once"] = json_loads_once

    warm_up = make_deltas(make_output(5_000, seed=1))
    scenarios = [
        ("cards", make_output, consumers, sizes),
        (
            "one long string",
            make_long_string,
            {k: consumers[k] for k in ("ours: feed", "ours: feed+value", "jiter trailing-strings")},
            sizes,
        ),
    ]
    print(f"## Structured-output parsing: CPU ns per byte (median; {platform.python_version()})")
    print()
    print(
        f"`{' '.join(['python', *sys.argv])}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, load average at the start "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; deltas of 4-8 characters; "
        f"`est.`: stopped at the CPU budget of {budget:g} s, extrapolated as time ~ fraction^2."
    )
    for scenario, make, chosen, scenario_sizes in scenarios:
        results: dict[str, dict[str, tuple[float, bool]]] = {}
        nbytes: dict[str, int] = {}
        for label, size in scenario_sizes.items():
            text = make(size)
            deltas = make_deltas(text)
            nbytes[label] = len(text.encode())
            check(text, deltas)
            repeats = 1 if args.quick else REPEATS[label]
            results[label] = {}
            for name, run in chosen.items():
                print(f"{scenario}, {label}: {name} ...", file=sys.stderr, flush=True)
                run(warm_up, budget)
                results[label][name] = measure(run, deltas, repeats, budget)
        report(scenario, results, nbytes, list(chosen))


def report(
    scenario: str,
    results: dict[str, dict[str, tuple[float, bool]]],
    nbytes: dict[str, int],
    names: list[str],
) -> None:
    def cell(label: str, name: str) -> str:
        seconds, estimated = results[label][name]
        ns = seconds / nbytes[label] * 1e9
        return f"{ns:,.0f} ({seconds:,.3f} s){' est.' if estimated else ''}"

    labels = list(results)
    print()
    print(f"### {scenario}: ns per byte (total CPU seconds)")
    print()
    print("| consumer | " + " | ".join(f"{lb} ({nbytes[lb]:,} B)" for lb in labels) + " |")
    print("| --- |" + " ---: |" * len(labels))
    for name in names:
        print(f"| {name} | " + " | ".join(cell(lb, name) for lb in labels) + " |")
    print()
    first, last = labels[0], labels[-1]
    for name in ("ours: feed", "ours: feed+value") if first != last else ():
        ratio = (results[last][name][0] / nbytes[last]) / (results[first][name][0] / nbytes[first])
        print(f"- {name}: per byte at {last} / at {first} = {ratio:.2f} (goal <= 1.5)")
    if "100 KB" in results:
        for rival in ("jiter trailing-strings", "jiter partial (openai)"):
            if rival in results["100 KB"]:
                ours = results["100 KB"]["ours: feed+value"][0]
                speedup = results["100 KB"][rival][0] / ours
                print(f"- at 100 KB, ours: feed+value is {speedup:,.0f}x faster than {rival}")


if __name__ == "__main__":
    main()
