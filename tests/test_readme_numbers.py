"""README.md's performance numbers must be rows of benchmarks/results/*.csv.

Every claim of the form `N tok/s` / `A–Bk output tok/s`, `N%` and `N× HF` in README.md is looked up:
a tok/s value must equal (at the precision written, `k` = thousands) a cell of a tokens-per-second
column of some CSV, a percentage a cell of a `pct*` column, and a ratio against HF either a
`speedup_vs_hf` cell or nanovllm / hf of two throughput.csv rows of the same workload (same
device, commit, model, number of requests and prompt tokens). Both ends of a range are checked.
Editing a number in README without a CSV row behind it fails this test.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from decimal import ROUND_HALF_UP, Decimal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
NUM = r"\d[\d,]*(?:\.\d+)?"
RANGE = rf"(?<![\w.])({NUM})(?:\s*[–-]\s*({NUM}))?"
CLAIMS = {  # kind -> pattern (group 1, 2: the range's ends; group 3: 'k')
    "tok/s": re.compile(rf"{RANGE}(k)?\s+(?:output\s+)?tok/s"),
    "pct": re.compile(rf"{RANGE}()%"),
    "x HF": re.compile(rf"{RANGE}()\s*[×x]\s+HF\b"),
}
MIN_TOK_S_CLAIMS = 8  # the README's headline has more: a parser that finds fewer has lost them


def claims(text: str) -> list[tuple[str, str, Decimal, int]]:
    """(kind, as written, value, decimals) for every number of a claim (each end of a range)."""
    out = []
    for kind, pattern in CLAIMS.items():
        for m in pattern.finditer(text):
            scale = 1000 if m.group(3) else 1
            for part in (m.group(1), m.group(2)):
                if part:
                    digits = part.replace(",", "")
                    decimals = len(digits.split(".")[1]) if "." in digits else 0
                    out.append((kind, m.group(0), Decimal(digits) * scale, decimals - (3 if scale == 1000 else 0)))
    return out


def shown(value: float, decimals: int) -> Decimal:
    """value rounded half-up as README writes it (decimals < 0: to tens, hundreds, ...)."""
    return Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def load_tables(directory: str = RESULTS) -> dict[str, list[dict]]:
    tables = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.csv"))):
        with open(path, newline="") as f:
            tables[os.path.basename(path)] = list(csv.DictReader(f))
    return tables


def _numbers(tables, column_ok) -> list[float]:
    out = []
    for rows in tables.values():
        for row in rows:
            for col, cell in row.items():
                if col and column_ok(col):
                    try:
                        out.append(float(cell))
                    except (TypeError, ValueError):
                        pass
    return out


def same_workload_ratios(rows: list[dict]) -> list[float]:
    """nanovllm / hf output tok/s for throughput rows of one workload measured at one commit on one device."""
    key = lambda r: (r["device"], r["commit"], r["model"], r["num_seqs"], r["input_tokens"])  # noqa: E731
    hf = {}
    for r in rows:
        if r["backend"] == "hf":
            hf.setdefault(key(r), []).append(float(r["output_tok_per_s"]))
    return [float(r["output_tok_per_s"]) / h for r in rows if r["backend"] == "nanovllm" for h in hf.get(key(r), [])]


def untraceable(text: str, tables: dict[str, list[dict]]) -> list[str]:
    """The claims of `text` that no CSV row gives."""
    candidates = {
        "tok/s": _numbers(tables, lambda c: "tok_per_s" in c or c.endswith("tok_s")),
        "pct": _numbers(tables, lambda c: c.startswith("pct")),
        "x HF": _numbers(tables, lambda c: c == "speedup_vs_hf")
                + same_workload_ratios(tables.get("throughput.csv", [])),
    }
    bad = []
    for kind, written, value, decimals in claims(text):
        if not any(shown(v, decimals) == value for v in candidates[kind]):
            bad.append(f"{written!r} ({kind} {value})")
    return bad


def test_readme_numbers_are_csv_rows():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = claims(text)
    assert sum(kind == "tok/s" for kind, *_ in found) >= MIN_TOK_S_CLAIMS, found
    bad = untraceable(text, load_tables())
    assert not bad, f"README numbers with no row in benchmarks/results/*.csv: {bad}"


def test_an_edited_number_is_caught():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    tables = load_tables()
    edited = text.replace("1,150–1,342 tok/s", "1,150–1,372 tok/s")
    assert edited != text
    assert untraceable(edited, tables) == ["'1,150–1,372 tok/s' (tok/s 1372)"]


def test_claim_parsing():
    text = "made 20.3–23.1k output tok/s, 966 tok/s (89.1–92.4% of it), ~2× HF on Qwen3-0.6B, H200 at 91%."
    got = [(kind, str(value), decimals) for kind, _, value, decimals in claims(text)]
    assert got == [("tok/s", "20300.0", -2), ("tok/s", "23100.0", -2), ("tok/s", "966", 0), ("pct", "89.1", 1),
                   ("pct", "92.4", 1), ("pct", "91", 0), ("x HF", "2", 0)]
    assert shown(23098.6, -2) == Decimal("23100") and shown(1149.5, 0) == Decimal("1150")


def test_ratio_needs_the_same_workload_for_both():
    def row(backend, seqs, tok_s):
        return {"device": "H200", "commit": "c1", "model": "qwen3-0.6b", "backend": backend, "num_seqs": str(seqs),
                "input_tokens": str(seqs * 500), "output_tok_per_s": str(tok_s)}

    rows = [row("nanovllm", 256, 22915.4), row("hf", 32, 370.6)]  # 62x, but HF ran an eighth of the workload
    assert same_workload_ratios(rows) == []
    assert untraceable("62× HF", {"throughput.csv": rows}) == ["'62× HF' (x HF 62)"]
    rows.append(row("hf", 256, 634.0))
    assert untraceable("36.1× HF", {"throughput.csv": rows}) == []
