"""IFCB (Imaging FlowCytobot) raw bins: ``.hdr`` + ``.adc`` + ``.roi`` files sharing a bin name.

One bin is one item; its rows are the ADC lines with a ROI (every line but those with a zero width or height,
IFCB's triggers without an image), in line order. The catalog keeps the raw ``.roi`` pixels losslessly (PNG of the
raw bytes, no min-max stretch) and names every image by its ADC line number (``<bin>_<roi:05d>``), as the IFCB
dashboards and classifier outputs do. A ROI the reader cannot cut (a fractional, negative or missing size or start
byte, bytes beyond the end of the .roi) is still a row: one with no image bytes and the reason in ``image_error``,
so that one bad ADC line never costs the bin's other ROIs.
The layouts are those of the WHOI IFCB software (pyifcb, ifcb-analysis): schema v1 and v2 headers and ADCs.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pzscale.errors import InputError
from pzscale.faults import is_transient
from pzscale.readers.base import Item, Reader, encode_png, keys_only, records

EXTENSIONS = (".adc", ".hdr", ".roi")
DEFAULT_SOURCE = "ifcb"

V1_NAME = re.compile(r"IFCB(\d+)_(\d{4})_(\d{3})_(\d{6})")
V2_NAME = re.compile(r"D(\d{8})T(\d{6})_IFCB(\d{3})")

# ADC columns by position (names differ between firmware versions, positions do not).
ADC_COLUMNS = {
    1: {"count": 15, "trigger": 0, "trigger_open_time": 7, "frame_grab_time": 8,
        "width": 11, "height": 12, "start_byte": 13},
    2: {"count": 24, "trigger": 0, "adc_time": 1, "width": 15, "height": 16, "start_byte": 17,
        "run_time": 22, "inhibit_time": 23},
}
MISSING_VALUE = -999.0  # v2 firmware writes -999 for values it did not measure

V2_FLOW_ML_PER_MIN = 0.25  # syringe pump flow of schema-2 instruments
V2_MAX_DISAGREEMENT = 0.02  # ADC and header volumes further apart than this: trust the header
V2_MAX_HEADER_GAP = 1.5  # a header look time beyond this many times the last trigger's is not believed
V1_MIN_PROC_TIME_S = 0.073  # dead time after each trigger on schema-1 instruments
V1_FLOW_ML_PER_S = 5 / 48000 * 40  # ml per syringe step x steps per second
SECONDS_PER_DAY = 86400.0

PLAN_THREADS = 16  # planning reads every .adc: overlap the round trips on object stores


def bin_schema(lid: str) -> int | None:
    """ADC schema (1 or 2) of a bin name, or None when ``lid`` is not a bin name."""
    if V1_NAME.fullmatch(lid):
        return 1
    if V2_NAME.fullmatch(lid):
        return 2
    return None


def bin_time(lid: str) -> datetime:
    """Sample time (UTC) from a bin name: v1 names carry a day of year, v2 names a calendar date."""
    try:
        if m := V1_NAME.fullmatch(lid):
            _, year, day, hms = m.groups()
            day_start = datetime(int(year), 1, 1, tzinfo=UTC) + timedelta(days=int(day) - 1)
            if int(day) < 1 or day_start.year != int(year):
                raise ValueError(f"day of year {day} out of range")
            return datetime.strptime(f"{day_start:%Y%m%d}{hms}", "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        if m := V2_NAME.fullmatch(lid):
            ymd, hms, _ = m.groups()
            return datetime.strptime(ymd + hms, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError as e:
        raise InputError(f"{lid}: bin name has an invalid date or time ({e})") from None
    raise InputError(f"{lid}: not an IFCB bin name (IFCB<n>_<YYYY>_<DDD>_<HHMMSS> or D<YYYYMMDD>T<HHMMSS>_IFCB<NNN>)")


def parse_hdr(text: str) -> dict[str, str]:
    """Header fields as text.

    v2 headers are ``key: value`` lines (values may end in a tab; firmware lines without a colon are
    skipped). v1 headers are double-quoted lines: ``"Name = value"`` lines, and a line of space-separated
    names followed by a line of quoted comma-separated values (the oldest layout has the names only,
    so those names get no value).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return {}
    if lines[0].startswith('"'):
        return parse_v1_hdr(lines)
    fields: dict[str, str] = {}
    for line in lines:
        key, colon, value = line.partition(":")
        if colon and key.strip():
            fields[key.strip()] = value.strip()
    return fields


def parse_v1_hdr(lines: list[str]) -> dict[str, str]:
    unquoted = [line.strip('"').strip() for line in lines]
    fields = {"softwareVersion": unquoted[0]}
    for i, line in enumerate(lines[1:], start=1):
        if '","' in line or is_number(unquoted[i]):
            values = [v.strip().strip('"').strip() for v in line.split(",")]
            names = unquoted[i - 1].split()
            fields.update(zip(names, values, strict=False))
        elif "=" in unquoted[i]:
            key, _, value = unquoted[i].partition("=")
            fields[key.strip()] = value.strip()
    return fields


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_adc(text: str, schema: int, *, name: str = "<adc>") -> dict[str, np.ndarray]:
    """ADC columns used here, by position, as float arrays (one entry per line; -999 becomes NaN).

    ``name`` (the file) goes into the one-line InputError raised for a malformed line (a wrong number of values,
    a value that is no number). ROI sizes and start bytes are not checked here but per ROI (``roi_problem``).
    """
    columns = ADC_COLUMNS[schema]
    expected = columns["count"]
    values = []
    for line_number, line in enumerate(text.rstrip().splitlines(), start=1):
        fields = line.split(",")
        if fields[-1].strip() == "":  # v1 lines end in a comma
            fields.pop()
        if len(fields) != expected:
            raise InputError(f"{name}: line {line_number} has {len(fields)} values, schema {schema} has {expected}")
        try:
            values.append([float(f) for f in fields])
        except ValueError:
            bad = next(f for f in fields if not is_number(f))
            raise InputError(f"{name}: line {line_number} has a non-numeric value {bad.strip()[:40]!r}") from None
    table = np.array(values, dtype=np.float64).reshape(len(values), expected)
    table[table == MISSING_VALUE] = np.nan
    return {key: table[:, col] for key, col in columns.items() if key != "count"}


def image_lines(adc: dict[str, np.ndarray]) -> np.ndarray:
    """0-based ADC line indices that are rows (ROI number = index + 1): every line but those with a zero width or
    height, which IFCB writes for a trigger without an image. A line whose ROI cannot be cut (``roi_problem``) is a
    row too, so that the row count of a bin depends on its ADC alone, at plan time and at read time alike."""
    return np.flatnonzero((adc["width"] != 0) & (adc["height"] != 0))  # NaN != 0: a missing size is a row


def roi_name(lid: str, line: int) -> str:
    """An image's name: its bin and ROI number (0-based ADC line + 1), as the IFCB dashboards write it."""
    return f"{lid}_{line + 1:05d}"


def roi_problem(width: float, height: float, start: float) -> str:
    """Why the ROI of an ADC line has no size or offset to cut it by, or '' when it has (its byte range is checked
    against the .roi when read)."""
    for what, value in (("width", width), ("height", height)):
        if math.isnan(value):
            return f"{what} is missing (-999 or NaN)"
        if value < 0:
            return f"{what} {value:g} is negative"
        if not math.isfinite(value) or value != round(value):
            return f"{what} {value:g} is not a whole number of pixels"
    if math.isnan(start):
        return "start byte is missing (-999 or NaN)"
    if not (math.isfinite(start) and start >= 0 and start == round(start)):
        return f"start byte {start:g} is not a byte offset"
    return ""


def ml_analyzed(adc: dict[str, np.ndarray], hdr: dict[str, str], schema: int) -> float | None:
    """Volume imaged (mL) in a bin, or None when it cannot be computed."""
    volume = ml_analyzed_v1(adc) if schema == 1 else ml_analyzed_v2(adc, hdr)
    return volume if volume is not None and math.isfinite(volume) and volume > 0 else None


def header_volume_implausible(adc: dict[str, np.ndarray], hdr: dict[str, str], schema: int) -> bool:
    """Whether a v2 bin's header look time (which ``ml_analyzed`` trusts when it disagrees with the ADC) cannot
    be right: shorter than the time of the last trigger, or over ``V2_MAX_HEADER_GAP`` times it (a header ~10x
    off is the known failure, pyifcb#70). A header a little longer is normal: the run goes on after the last
    trigger."""
    if schema == 1 or not len(adc["run_time"]):
        return False
    from_adc = float(adc["run_time"][-1]) - float(adc["inhibit_time"][-1])
    run, inhibit = number(hdr.get("runTime")), number(hdr.get("inhibitTime"))
    if run is None or inhibit is None or not (math.isfinite(from_adc) and from_adc > 0):
        return False
    from_hdr = run - inhibit
    return from_hdr < (1 - V2_MAX_DISAGREEMENT) * from_adc or from_hdr > V2_MAX_HEADER_GAP * from_adc


def ml_analyzed_v2(adc: dict[str, np.ndarray], hdr: dict[str, str]) -> float | None:
    """0.25 mL/min x (run time - inhibit time); the last ADC line's times unless the header disagrees."""
    def volume(run_time: float | None, inhibit_time: float | None) -> float | None:
        if run_time is None or inhibit_time is None or not math.isfinite(run_time - inhibit_time):
            return None
        look_time = run_time - inhibit_time
        return V2_FLOW_ML_PER_MIN * look_time / 60 if look_time > 0 else None

    from_adc = volume(float(adc["run_time"][-1]), float(adc["inhibit_time"][-1])) if len(adc["run_time"]) else None
    from_hdr = volume(number(hdr.get("runTime")), number(hdr.get("inhibitTime")))
    if from_adc is not None and from_hdr is not None:
        # the last trigger can come well before the end of the run: then only the header has the full time
        return from_adc if abs(from_adc - from_hdr) <= V2_MAX_DISAGREEMENT * from_hdr else from_hdr
    return from_adc if from_adc is not None else from_hdr


def ml_analyzed_v1(adc: dict[str, np.ndarray]) -> float | None:
    """Look time x flow: run time (last frame grab) minus the dead time after each trigger (pyifcb's method)."""
    if not len(adc["trigger"]):
        return None
    _, first_lines = np.unique(adc["trigger"], return_index=True)
    keep = np.sort(first_lines)  # several ROIs of one trigger share its times
    # bins crossing midnight have negative times
    frame_grab, trigger_open = adc["frame_grab_time"][keep], adc["trigger_open_time"][keep]
    frame_grab = np.where(frame_grab < 0, frame_grab + SECONDS_PER_DAY, frame_grab)
    trigger_open = np.where(trigger_open < 0, trigger_open + SECONDS_PER_DAY, trigger_open)
    proc_time = np.maximum(trigger_open[1:] - frame_grab[:-1], V1_MIN_PROC_TIME_S)
    # the extra MIN_PROC_TIME matches the MATLAB reference (ifcb-analysis) that pyifcb reproduces
    look_time = frame_grab[-1] - proc_time.sum() - V1_MIN_PROC_TIME_S
    return float(look_time * V1_FLOW_ML_PER_S)


def number(text: str | None) -> float | None:
    """A finite float from header text, else None."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def header_value(hdr: dict[str, str], *keys: str) -> float | None:
    """First numeric value among ``keys`` (compared without case)."""
    lowered = {k.lower(): v for k, v in hdr.items()}
    for key in keys:
        value = number(lowered.get(key.lower()))
        if value is not None:
            return value
    return None


def bin_metadata(lid: str, hdr: dict[str, str], adc: dict[str, np.ndarray], schema: int) -> dict[str, Any]:
    """Record columns shared by every image of a bin."""
    depth = header_value(hdr, "depth")
    return {
        "timestamp": f"{bin_time(lid):%Y-%m-%dT%H:%M:%SZ}",
        "Latitude": header_value(hdr, "gpsLatitude"),
        "Longitude": header_value(hdr, "gpsLongitude"),
        "Depth_min": depth,
        "Depth_max": depth,
        # housing sensors: v1 names them Temp/Humidity, v2 (2022+) temperature/humidity
        "Temperature": header_value(hdr, "Temp", "temperature"),
        "Humidity": header_value(hdr, "Humidity"),
        "volume_analysed_ml": ml_analyzed(adc, hdr, schema),
        "reader_qc": "volume_implausible" if header_volume_implausible(adc, hdr, schema) else "",
    }


def read_text(path: str, storage_options: dict | None) -> str:
    with fsspec.open(path, "rb", **(storage_options or {})) as fh:
        return fh.read().decode("latin-1")  # headers are ASCII; latin-1 never fails, so bad bytes fail as numbers


def protocol_prefix(path: str) -> str:
    protocol = fsspec.utils.get_protocol(path)
    return "" if protocol == "file" else f"{protocol}://"


def split_bin_file(path: str) -> tuple[str, str] | None:
    """(stem path, extension) when ``path`` is a .adc/.hdr/.roi file named like a bin, else None."""
    stem, dot, ext = path.rpartition(".")
    if not dot or f".{ext}" not in EXTENSIONS:
        return None
    lid = stem.rsplit("/", 1)[-1]
    return (stem, f".{ext}") if bin_schema(lid) else None


def find_bins(path: str, storage_options: dict | None) -> dict[str, dict[str, int]]:
    """Bins under ``path`` (a bin file or a folder): stem path -> {extension: size in bytes}."""
    fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
    prefix = protocol_prefix(path)
    if fs.isdir(fpath):
        listing = {name: info.get("size") or 0 for name, info in fs.find(fpath, detail=True).items()}
    elif fs.exists(fpath):
        found = split_bin_file(fpath)
        if found is None:
            raise InputError(f"{path}: not an IFCB bin file (.adc/.hdr/.roi named like a bin)")
        listing = {}
        for ext in EXTENSIONS:
            try:
                listing[found[0] + ext] = fs.info(found[0] + ext).get("size") or 0
            except FileNotFoundError:
                continue
    else:
        raise InputError(f"{path}: no such file or folder")
    bins: dict[str, dict[str, int]] = {}
    for name, size in listing.items():
        if found := split_bin_file(name):
            bins.setdefault(prefix + found[0], {})[found[1]] = int(size)
    if not bins:
        raise InputError(f"{path}: no IFCB bins found (.adc/.hdr/.roi files named like IFCB bins)")
    return bins


def scan_bin(stem: str, sizes: dict[str, int], source: str, storage_options: dict | None) -> Item:
    """One bin as an Item with its exact image count, or with an error saying why it cannot be read."""
    lid = stem.rsplit("/", 1)[-1]
    schema = bin_schema(lid)
    info = {"lid": lid, "schema": schema, "source": source, **{ext[1:]: stem + ext for ext in EXTENSIONS}}
    total = sum(sizes.values())

    def failed(problem: str) -> Item:
        return Item(source=stem, rows=0, size=total, info=info, error=f"{stem}: {problem}")

    if all(size == 0 for size in sizes.values()):
        return failed("all files are empty")
    for ext in EXTENSIONS:
        if ext not in sizes:
            return failed(f"no {ext} file (partial bin)")
    if sizes[".adc"] == 0:
        return failed("header-only bin (.adc and .roi are empty)" if sizes[".roi"] == 0 else "empty .adc (no triggers)")
    if sizes[".hdr"] == 0:
        return failed("empty .hdr")
    try:
        bin_time(lid)
        adc = parse_adc(read_text(stem + ".adc", storage_options), schema, name=stem + ".adc")
    except InputError as e:
        return Item(source=stem, rows=0, size=total, info=info, error=str(e))
    except OSError as e:
        if is_transient(e):
            raise
        return failed(f"cannot read the .adc ({' '.join(str(e).split())[:200]})")
    try:
        hdr = parse_hdr(read_text(stem + ".hdr", storage_options))
    except OSError as e:
        if is_transient(e):
            raise
        return failed(f"cannot read the .hdr ({' '.join(str(e).split())[:200]})")
    # ROIs that cannot be cut (fractional or negative sizes, bytes beyond the .roi...) are rows too: the read gives
    # them no image bytes and the reason, so the count here is exact whatever the ADC's values
    rows = len(image_lines(adc))
    return Item(source=stem, rows=rows, size=total, info=info, notes=header_notes(stem, hdr, rows))


def header_notes(stem: str, hdr: dict[str, str], rows: int) -> list[str]:
    """A note when the header's ROI count disagrees with the ADC (the ADC is what is read).

    Like is compared with like: v2 firmware's ``roiCount`` counts ROIs, i.e. the ADC lines with a non-zero width and
    height (the sample bins: 2 of 3 lines, 7 of 8, 33 of 45), not the ADC's lines nor its triggers (``triggerCount``,
    41 for those 45 lines: several ROIs can share a trigger). That is the bin's row count here (``image_lines``,
    ROIs the reader cannot cut included: the instrument counted them). v1 headers have no ROI count.
    """
    expected = header_value(hdr, "roiCount")
    if expected is None or expected == rows:
        return []
    lid = stem.rsplit("/", 1)[-1]
    return [f"{stem}: header roiCount {expected:g} but {lid}.adc has {rows} ROIs (lines with a non-zero width and "
            f"height); the .adc is read"]


class IFCBReader(Reader):
    name = "ifcb"
    description = "IFCB raw bins (.hdr + .adc + .roi, schema v1 and v2), one image per non-empty ROI"

    def guess_can_open(self, path: str, *, storage_options: dict | None = None) -> bool:
        path = str(path)
        if split_bin_file(path):
            return True
        try:
            fs, fpath = fsspec.core.url_to_fs(path, **(storage_options or {}))
            if not fs.isdir(fpath):
                return False
            return any(split_bin_file(name) for _, _, files in fs.walk(fpath) for name in files)
        except (OSError, ValueError) as e:
            if is_transient(e):
                raise  # a throttled listing is not "not ours": the caller retries
            return False

    def plan(self, path: str, *, source: str | None = None, storage_options: dict | None = None) -> list[Item]:
        bins = find_bins(str(path), storage_options)
        order = sorted(bins, key=lambda stem: (stem.rsplit("/", 1)[-1], stem))
        with ThreadPoolExecutor(max_workers=min(PLAN_THREADS, len(order))) as pool:
            return list(pool.map(lambda stem: scan_bin(stem, bins[stem], source or DEFAULT_SOURCE, storage_options),
                                 order))

    def read_keys(self, item: Item, *, storage_options: dict | None = None) -> pa.Table:
        """The id columns of every row from the .adc alone (ids are ROI numbers): no .roi read, no PNG made."""
        lid, source = item.info["lid"], item.info["source"]
        names = [roi_name(lid, line) for line in self._lines(item, storage_options)[0]]
        return keys_only(records([{"dataset": source, "ObjID": name, "original_path": f"/{lid}/{name}.png"}
                                  for name in names]))

    def _lines(self, item: Item, storage_options: dict | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The bin's rows (0-based ADC lines, as planned) and its ADC."""
        if item.error:
            raise InputError(item.error)
        info = item.info
        adc = parse_adc(read_text(info["adc"], storage_options), info["schema"], name=info["adc"])
        lines = image_lines(adc)
        if len(lines) != item.rows:
            raise InputError(f"{info['adc']}: has {len(lines)} images now, {item.rows} when planned")
        return lines, adc

    def read(self, item: Item, first: int, stop: int, *, storage_options: dict | None = None) -> pa.Table:
        info = item.info
        if item.error:
            raise InputError(item.error)
        if not 0 <= first <= stop <= item.rows:
            raise InputError(f"{item.source}: rows {first}..{stop} out of range (bin has {item.rows} images)")
        lid, schema, source = info["lid"], info["schema"], info["source"]
        lines, adc = self._lines(item, storage_options)
        metadata = bin_metadata(lid, parse_hdr(read_text(info["hdr"], storage_options)), adc, schema)
        wanted = lines[first:stop]
        if not len(wanted):
            return records([])
        adc_name = info["adc"].rsplit("/", 1)[-1]
        problems: dict[int, str] = {}  # ADC line -> why its ROI has no image
        cuts: dict[int, tuple[int, int, int]] = {}  # ADC line -> (start byte, width, height)
        for line in wanted:
            width, height, start = (float(adc[key][line]) for key in ("width", "height", "start_byte"))
            if why := roi_problem(width, height, start):
                problems[line] = why
            else:
                cuts[line] = (int(start), int(width), int(height))
        buf, low = b"", 0
        if cuts:
            with fsspec.open(info["roi"], "rb", **(storage_options or {})) as fh:
                roi_size = fh.seek(0, 2)
                # read only the byte range these ROIs span (.roi files can be hundreds of MB), never past the end
                low = min(start for start, _, _ in cuts.values())
                high = min(roi_size, max(start + width * height for start, width, height in cuts.values()))
                if low < high:
                    fh.seek(low)
                    buf = fh.read(high - low)
                    if len(buf) != high - low:
                        raise InputError(f"{info['roi']}: ended at byte {low + len(buf)}, ROIs need bytes up to "
                                         f"{high} of its {roi_size}")
            for line, (start, width, height) in cuts.items():
                if start + width * height > roi_size:
                    problems[line] = (f"bytes {start}..{start + width * height} are beyond the end of "
                                      f"{info['roi'].rsplit('/', 1)[-1]} ({roi_size} bytes)")
        rows = []
        for line in wanted:
            name = roi_name(lid, line)
            row = {
                "image": {"bytes": b"", "path": f"{name}.png"},
                "dataset": source,
                "instrument": "IFCB",
                "sample": lid,  # the bin: one syringe of water, its volume in ml_analyzed
                "original_label": "",  # raw bins carry no labels
                "original_path": f"/{lid}/{name}.png",  # read_keys makes the same id columns
                "ObjID": name,
                **metadata,
            }
            if line in problems:
                row["image_error"] = f"{adc_name} roi {line + 1}: {problems[line]}"
            else:
                start, width, height = cuts[line]
                pixels = np.frombuffer(buf, np.uint8, count=width * height, offset=start - low).reshape(height, width)
                row["image"]["bytes"] = encode_png(pixels)
            rows.append(row)
        return records(rows)
