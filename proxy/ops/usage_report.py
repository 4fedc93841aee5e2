"""`dashscope-proxy usage`: images and cost per key, model and day, read from the usage ledger.

    dashscope-proxy usage [--since DATE] [--until DATE] [--by key,model,day]
                          [--format table|csv|json] [--config PATH] [FILE ...]

The monthly chargeback in one command: `--since 2026-11-01 --until 2026-12-01` is
November (`--since` inclusive, `--until` exclusive, UTC dates, as the ledger's `ts`).
Without FILEs it reads the configured `server.usage_log` (`--config`, else env
`DASHSCOPE_PROXY_CONFIG`, else the default `./dashscope-proxy-usage.jsonl`) and every
rotated sibling next to it (`usage.jsonl.1`, `usage.jsonl.2.gz`, `usage.jsonl-20261101`,
...): logrotate's names, numbered or dated, gzipped or not. A relative `usage_log` is
relative to where the command runs, as it is to where the gateway runs.

Why it is built this way:
- It streams: one line at a time, from plain or gzipped files, so a 1 GB log costs
  the memory of its groups (keys x models x days), not of the file. Lines outside the
  dates are skipped by their `ts` prefix without being parsed.
- Lines with `"images": null` are answers DashScope may have billed but nobody could
  count (`dashscope_proxy_unmetered_answers_total`): they add no images, and are
  reported as `unmetered_answers` so the gap is visible.
- A line that does not parse (a torn last line after a crash, an edit) is counted and
  reported on stderr with its first location; it never stops the report.
- Costs are summed in integer nano-units, so a month of additions does not drift.
  Images whose line has `cost: null` (no price when metered) are counted in
  `unpriced_images`; `currency` is the one currency the priced lines name ("mixed"
  when the price table's currency changed within a group: the sum then mixes units).

CSV columns are the `--by` fields (`day` as `YYYY-MM-DD`) then `images`, `cost`,
`currency`, `unpriced_images`, and a last row whose first column is `total`.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import re
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config.model import DEFAULT_USAGE_LOG, ConfigError
from proxy.config.parse import usage_log_setting
from proxy.core.pricing import NANO
from proxy.jsonutil import dumps, loads

BY_FIELDS = ("key", "model", "day")
_TS_PREFIX = b'{"ts":"'
_DAY = re.compile(rb"^\d{4}-\d\d-\d\d$")
_DAY_TEXT = re.compile(r"\d{4}-\d\d-\d\d")
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(slots=True)
class Totals:
    images: int = 0
    cost: int = 0  # nano-units
    unpriced: int = 0
    currencies: set[str] = field(default_factory=set)

    def add(self, other: Totals) -> None:
        self.images += other.images
        self.cost += other.cost
        self.unpriced += other.unpriced
        self.currencies |= other.currencies

    @property
    def currency(self) -> str:
        if len(self.currencies) > 1:
            return "mixed"
        return next(iter(self.currencies), "")


@dataclass(slots=True)
class Report:
    by: tuple[str, ...]
    since: str | None
    until: str | None
    groups: dict[tuple[str, ...], Totals] = field(default_factory=dict)
    unmetered: int = 0
    malformed: int = 0
    first_malformed: str | None = None
    lines: int = 0
    files: list[str] = field(default_factory=list)

    def total(self) -> Totals:
        out = Totals()
        for t in self.groups.values():
            out.add(t)
        return out

    def bad_line(self, where: str) -> None:
        self.malformed += 1
        if self.first_malformed is None:
            self.first_malformed = where


# ------------------------------------------------------------------------ files


def log_files(path: Path) -> list[Path]:
    """`path` and its rotated siblings (numbered, dated, gzipped), oldest first."""
    sibling = re.compile(re.escape(path.name) + r"(?:[.-][0-9][0-9-]*)?(?:\.gz)?$")
    parent = path.parent
    found = [p for p in parent.iterdir() if sibling.fullmatch(p.name) and p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p != path))


def open_lines(path: Path) -> Iterator[bytes]:
    """The lines of a plain or gzipped file (decided by its first bytes), or stdin for `-`."""
    if str(path) == "-":
        yield from sys.stdin.buffer
        return
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if gzipped:
            yield from gzip.GzipFile(fileobj=raw)
        else:
            yield from raw


# ---------------------------------------------------------------------- reading


def utc_day(ts: object) -> str | None:
    """The UTC date (`YYYY-MM-DD`) of a ledger `ts`, None when it is not a timestamp."""
    if type(ts) is not str:
        return None
    if len(ts) == 24 and ts[23] == "Z" and _DAY_TEXT.fullmatch(ts, 0, 10):
        return ts[:10]  # what the ledger writes: 2026-11-22T02:58:51.858Z
    try:
        when = dt.datetime.fromisoformat(ts)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).date().isoformat()


def read(report: Report, path: Path) -> None:
    """Add one file's lines to `report`. The loop is the report's whole cost on a big log:
    it checks types with `type() is` and looks each field up once."""
    report.files.append(str(path))
    since, until = report.since, report.until
    since_b = since.encode() if since else None
    until_b = until.encode() if until else None
    by, groups = report.by, report.groups
    number = 0
    for number, raw in enumerate(open_lines(path), 1):
        if raw[:7] == _TS_PREFIX and raw[30:32] == b'Z"' and _DAY.match(raw[7:17]):
            # The ledger writes `ts` first, in UTC: lines outside the dates need no parsing.
            day_b = raw[7:17]
            if (since_b and day_b < since_b) or (until_b and day_b >= until_b):
                continue
        try:
            obj = loads(raw)
        except (ValueError, RecursionError):
            if raw.strip():
                report.bad_line(f"{path}:{number}")
            continue
        fields = _fields(obj)
        if fields is None:
            report.bad_line(f"{path}:{number}")
            continue
        day, images, cost, currency = fields
        if (since and day < since) or (until and day >= until):
            continue
        if images is None:
            report.unmetered += 1
            continue
        group = tuple([day if f == "day" else obj[f] for f in by])
        totals = groups.get(group)
        if totals is None:
            totals = groups[group] = Totals()
        totals.images += images
        if cost is None:
            totals.unpriced += images
        else:
            totals.cost += round(cost * NANO)
            if currency:
                totals.currencies.add(currency)
    report.lines += number


def _fields(obj: Any) -> tuple[str, int | None, float | None, str | None] | None:
    """(day, images, cost, currency) of a ledger line; None when it is not one."""
    if type(obj) is not dict:
        return None
    get = obj.get
    day = utc_day(get("ts"))
    images, cost, currency = get("images"), get("cost"), get("currency")
    if day is None or type(get("key")) is not str or type(get("model")) is not str:
        return None
    if images is not None and (type(images) is not int or images < 0):
        return None
    if cost is not None and type(cost) is not float and type(cost) is not int:
        return None
    if currency is not None and type(currency) is not str:
        return None
    return day, images, cost, currency


# ---------------------------------------------------------------------- output


def money(nano_units: int) -> str:
    """`12.345`, `0`, `0.000000001`: exact, no float formatting noise."""
    whole, frac = divmod(nano_units, NANO)
    return f"{whole}.{frac:09d}".rstrip("0").rstrip(".")


def rows(report: Report) -> list[list[str]]:
    """Header, one row per group (sorted), and the `total` row."""
    out = [[*report.by, "images", "cost", "currency", "unpriced_images"]]
    for group in sorted(report.groups):
        t = report.groups[group]
        out.append([*group, str(t.images), money(t.cost), t.currency, str(t.unpriced)])
    total = report.total()
    label = ["total", *([""] * (len(report.by) - 1))] if report.by else ["total"]
    out.append([*label, str(total.images), money(total.cost), total.currency, str(total.unpriced)])
    return out


def as_csv(report: Report) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows(report))
    return buf.getvalue()


def as_table(report: Report) -> str:
    table = rows(report)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    numeric = {len(report.by), len(report.by) + 1, len(report.by) + 3}

    def line(r: list[str]) -> str:
        cells = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    body = [line(table[0]), rule, *(line(r) for r in table[1:-1]), rule, line(table[-1])]
    window = f"{report.since or 'the beginning'} to {report.until or 'now'} (UTC, end exclusive)"
    body.append("")
    body.append(f"{window}; {report.lines} line(s) in {len(report.files)} file(s)")
    if report.unmetered:
        body.append(
            f"unmetered answers: {report.unmetered} (DashScope may have billed images "
            "no count shows; see dashscope_proxy_unmetered_answers_total)"
        )
    return "\n".join(body) + "\n"


def as_json(report: Report) -> str:
    def item(t: Totals) -> dict[str, Any]:
        return {
            "images": t.images,
            "cost": t.cost / NANO,
            "currency": t.currency or None,
            "unpriced_images": t.unpriced,
        }

    doc = {
        "since": report.since,
        "until": report.until,
        "by": list(report.by),
        "groups": [
            {**dict(zip(report.by, g, strict=True)), **item(report.groups[g])}
            for g in sorted(report.groups)
        ],
        "total": item(report.total()),
        "unmetered_answers": report.unmetered,
        "malformed_lines": report.malformed,
        "lines": report.lines,
        "files": report.files,
    }
    return dumps(doc).decode() + "\n"


FORMATS = {"table": as_table, "csv": as_csv, "json": as_json}


# ------------------------------------------------------------------ command line


def _date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD, UTC)") from None


def _by(text: str) -> tuple[str, ...]:
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    wrong = [f for f in fields if f not in BY_FIELDS]
    if wrong or len(set(fields)) != len(fields):
        raise argparse.ArgumentTypeError(
            f"--by takes distinct fields among {', '.join(BY_FIELDS)}, got {text!r}"
        )
    return fields


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dashscope-proxy usage",
        description="Images and cost per key, model and day, from the gateway's usage log.",
    )
    p.add_argument("--since", type=_date, help="first UTC day included (YYYY-MM-DD)")
    p.add_argument("--until", type=_date, help="first UTC day NOT included (YYYY-MM-DD)")
    p.add_argument(
        "--by", type=_by, default=("key", "model"), help="key,model,day (default key,model)"
    )
    p.add_argument("--format", choices=sorted(FORMATS), default="table")
    p.add_argument("--config", "-c", help="the gateway's config (env DASHSCOPE_PROXY_CONFIG)")
    p.add_argument("files", nargs="*", metavar="FILE", help="usage logs (.gz too; - is stdin)")
    return p


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    args = parser().parse_args(argv)
    if args.since and args.until and args.since >= args.until:
        print("usage: --since must be before --until", file=sys.stderr)
        return 2
    report = Report(args.by, args.since, args.until)
    if args.files:
        paths = [Path(f) for f in args.files]
        missing = [str(p) for p in paths if str(p) != "-" and not p.is_file()]
        if missing:
            print(f"usage: no such file: {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        config = args.config or environ.get("DASHSCOPE_PROXY_CONFIG")
        try:
            setting = usage_log_setting(config, environ) if config else DEFAULT_USAGE_LOG
        except ConfigError as exc:
            print(f"usage: {'; '.join(exc.problems)}", file=sys.stderr)
            return 2
        if setting is None:
            print(
                f"usage: {config} turns the usage log off (server.usage_log: null); pass FILEs",
                file=sys.stderr,
            )
            return 2
        base = Path(setting)
        if not base.parent.is_dir() or not (paths := log_files(base)):
            print(f"usage: no usage log at {base} (nor rotated files next to it)", file=sys.stderr)
            return 1
    for path in paths:
        try:
            read(report, path)
        except (OSError, EOFError, zlib.error) as exc:  # a cut .gz: keep what was read
            report.bad_line(f"{path}: {exc}")
    sys.stdout.write(FORMATS[args.format](report))
    if report.malformed:
        print(
            f"usage: skipped {report.malformed} malformed line(s); "
            f"first at {report.first_malformed}",
            file=sys.stderr,
        )
    if args.format != "table" and report.unmetered:
        print(f"usage: {report.unmetered} unmetered answer(s) (images unknown)", file=sys.stderr)
    return 0
