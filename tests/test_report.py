"""The report: built from stored artefacts only, every number traceable, untrusted text inert."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from test_report_support import HOSTILE, IMG, SCRIPT, report_run  # noqa: F401  (fixture)

from alignscope.errors import InputError
from alignscope.report import build_report
from alignscope.report.build import format_value
from alignscope.report.serve import make_server, url
from alignscope.report.svg import check_svg, figure, label, to_svg

SECTIONS = ["provenance", "training", "comparison", "metrics", "planted", "guise", "covert-overt", "stereo-pairs",
            "agreement", "toxicity", "privacy", "attribution", "curation"]
PLOTS = ["plot-training-curves", "plot-planted-gap", "plot-guise-adjectives", "plot-covert-overt", "plot-stereo-pairs",
         "plot-agreement-heatmap", "plot-toxicity", "plot-attribution-recovery", "plot-curation-curve"]


class Page(html.parser.HTMLParser):
    """Tags, attributes and the text of numeric cells of a rendered page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.num_cells: list[str] = []
        self.text: list[str] = []
        self._in_num = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_num = tag == "td" and dict(attrs).get("class") == "num"

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in_num = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_num:
            self.num_cells.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def built(report_run: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    out = tmp_path_factory.mktemp("report")
    paths = build_report(report_run, out)
    return paths, json.loads(paths.json.read_text())


def section(doc: dict, id: str) -> dict:
    return next(s for s in doc["sections"] if s["id"] == id)


def test_report_has_every_section_and_plot(built):
    paths, doc = built
    page = parse(paths.html)
    ids = {attrs.get("id") for _, attrs in page.tags}
    assert [s["id"] for s in doc["sections"]] == SECTIONS
    assert set(SECTIONS) <= ids and set(PLOTS) <= ids
    assert doc["kind"] == "study" and doc["models"] == ["base", "aligned"]
    shown = {s["id"] for s in doc["sections"] if s["status"] == "shown"}
    assert shown == set(SECTIONS) - {"privacy"}
    assert "privacy probe was not audited" in section(doc, "privacy")["absent"]
    assert "plot-privacy-leakage" not in ids  # never an empty plot


def test_curation_shows_the_predicted_share_beside_the_retrained_one(built):
    _, doc = built
    [curve] = [p for p in section(doc, "curation")["parts"] if p.get("caption") == "Curation curve"]
    columns = curve["columns"]
    removed, predicted = columns.index("fraction_of_increase_removed"), columns.index("predicted_fraction_removed")
    assert predicted == removed + 1 and all(row[predicted] is not None for row in curve["rows"])


def test_page_is_self_contained(built):
    paths, _ = built
    page = parse(paths.html)
    tags = {tag for tag, _ in page.tags}
    assert not tags & {"script", "iframe", "object", "embed", "img", "base", "form"}
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            assert not name.startswith("on")
            if name in ("href", "src", "xlink:href"):
                assert value is None or value.startswith("#") or (tag, value) == ("link", "data:,"), value
    assert "Content-Security-Policy" in paths.html.read_text()


def _numbers(obj) -> set[str]:
    out: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            out |= _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            out |= _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out |= {format_value(obj), format_value(obj, "p")}
    return out


def test_format_value_avoids_scientific_notation_for_thousands() -> None:
    assert format_value(1270.4) == "1270" and format_value(-2500.0) == "-2500" and format_value(999.7) == "1000"
    assert format_value(0.000123) == "0.000123" and format_value(2.5e7) == "2.5e+07"
    assert format_value(0.7828) == "0.783" and format_value(0.00021, "p") == "0.00021" and format_value(3) == "3"


def test_every_number_shown_is_in_report_json(built):
    paths, doc = built
    cells = parse(paths.html).num_cells
    assert len(cells) > 100
    known = _numbers(doc)
    assert [c for c in cells if c not in known] == []


def test_numbers_equal_the_stored_files(built, report_run):  # noqa: F811
    _, doc = built
    study = json.loads((report_run / "study.json").read_text())
    stored = pd.read_parquet(report_run / study["comparisons"][0]["path"] / "comparison.parquet")
    table = section(doc, "comparison")["parts"][0]
    rows = pd.DataFrame(table["rows"], columns=table["columns"])
    assert len(rows) == len(stored)
    for column in ("value_a", "value_b", "delta", "ci_low", "ci_high", "p_holm"):
        assert rows[column].tolist() == pytest.approx(stored[column].tolist(), nan_ok=True)
    assert set(rows["verdict"]) <= {"better", "worse", "unchanged"}
    recovery = section(doc, "attribution")["parts"][0]
    assert recovery["columns"] == ["estimator", "auc", "recall_at_k"]
    assert recovery["rows"][1] == ["datainf", 0.8125, 0.5]
    planted = next(p for p in section(doc, "planted")["parts"] if p["type"] == "plot")
    source = planted["sources"][0]
    gap = pd.read_parquet(report_run / source)["gap"].tolist()
    assert planted["data"]["panels"][0]["series"]["base"]["value"] == pytest.approx(gap)
    for s in doc["sections"]:
        for src in s["sources"]:
            assert (report_run / src).is_file(), src


def test_hostile_strings_are_text_not_markup(built):
    paths, doc = built
    raw = paths.html.read_text()
    for hostile in HOSTILE:
        assert hostile not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in raw or "&quot;&gt;&lt;img" in raw
    page = parse(paths.html)
    text = "".join(page.text)
    assert SCRIPT in text and IMG in text  # decoded, they are plain text on the page
    svg = raw[raw.index('id="plot-guise-adjectives"'):]
    svg = svg[: svg.index("</figure>")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg  # the adjective, as an SVG label
    assert "$x$ costs $5" in svg  # dollar signs drawn literally, not as mathtext
    assert SCRIPT in json.dumps(doc)  # report.json keeps the data as data


def test_rebuild_is_deterministic(built, report_run, tmp_path):  # noqa: F811
    first, _ = built
    html, data = build_report(report_run, tmp_path)  # also unpacks like a tuple
    assert html.read_bytes() == first.html.read_bytes()
    assert data.read_bytes() == first.json.read_bytes()


def _copy_run(report_run: Path, tmp_path: Path) -> Path:  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(report_run, run)
    return run


def test_stages_not_run_or_missing_are_said_plainly(report_run, tmp_path):  # noqa: F811
    run = _copy_run(report_run, tmp_path)
    study = json.loads((run / "study.json").read_text())
    study.pop("curation")
    study["attribution"] = "attribution/does-not-exist"
    (run / "study.json").write_text(json.dumps(study))
    doc = json.loads(build_report(run).json.read_text())
    assert section(doc, "curation")["absent"] == "Not run: the study did not run curation."
    assert "attribution/does-not-exist/summary.json is missing" in section(doc, "attribution")["absent"]
    html = (run / "report.html").read_text()
    assert "plot-curation-curve" not in html and "plot-attribution-recovery" not in html


def test_damaged_artefacts_cost_only_their_section(report_run, tmp_path):  # noqa: F811
    run = _copy_run(report_run, tmp_path)
    for path in (run / "audits" / "aligned").glob("audit_planted_bias/*/tables/per_trait.parquet"):
        path.write_bytes(b"not parquet")
    for path in (run / "audits" / "base").glob("audit_crows_pairs/*/tables/by_bias_type.parquet"):
        pd.read_parquet(path).drop(columns="stereotype_pct").to_parquet(path)
    doc = json.loads(build_report(run).json.read_text())
    assert "per_trait.parquet could not be read" in section(doc, "planted")["absent"]
    assert "KeyError" in section(doc, "stereo-pairs")["absent"]
    assert section(doc, "comparison")["status"] == "shown"


def test_plain_audit_run_reports_its_audits(report_run, tmp_path):  # noqa: F811
    run = _copy_run(report_run, tmp_path) / "audits" / "base"
    doc = json.loads(build_report(run).json.read_text())
    assert doc["kind"] == "audit" and doc["models"] == ["base"]
    assert section(doc, "comparison")["status"] == "absent"
    assert section(doc, "planted")["status"] == "shown"
    assert section(doc, "attribution")["absent"] == "Not run: this is a single audit run."


def test_bad_runs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a run directory"):
        build_report(tmp_path / "nope")
    with pytest.raises(InputError, match="neither study.json nor audit results"):
        build_report(tmp_path)
    (tmp_path / "study.json").write_text("[1, 2")
    with pytest.raises(InputError, match="not valid JSON"):
        build_report(tmp_path)


def test_report_command_bad_run_is_one_line_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "alignscope.cli", "report", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "not a run directory" in out.stderr


def test_svg_labels_and_check():
    assert label("a\x00b\nc") == "ab c" and label("$x$") == r"\$x\$" and len(label("x" * 100)) == 48
    with figure("t", 2, 2) as fig:
        ax = fig.subplots()
        ax.bar([0], [1])
        ax.set_xticks([0], [label(f"{SCRIPT} $\\alpha$")])
        svg = to_svg(fig, "t")
    assert "&lt;script&gt;" in svg and "<script" not in svg
    for bad in ('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg"><rect onload="alert(1)"/></svg>',
                '<svg xmlns="http://www.w3.org/2000/svg" xmlns:x="http://www.w3.org/1999/xlink">'
                '<use x:href="http://evil/x.svg#a"/></svg>', "<svg><unclosed></svg>"):
        with pytest.raises(RuntimeError, match="refusing"):
            check_svg(bad)


def _get(address: str, host: str | None = None) -> tuple[int, bytes, dict]:
    request = urllib.request.Request(address, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, b"", {}


def test_view_server_serves_only_the_report_on_loopback(built):
    paths, _ = built
    server = make_server(paths.html, 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = url(server)
        assert server.server_address[0] == "127.0.0.1" and base.startswith("http://127.0.0.1:")
        status, body, headers = _get(base)
        assert status == 200 and body == paths.html.read_bytes()
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert _get(base + "report.html")[0] == 200
        for other in ("report.json", "../study.json", "audits/base/manifest.json", "%2e%2e/study.json"):
            assert _get(base + other)[0] == 404, other
        assert _get(base, host="evil.example:80")[0] == 403
    finally:
        server.shutdown()
        server.server_close()


def test_view_command_prints_url_and_serves(report_run, tmp_path):  # noqa: F811
    run = _copy_run(report_run, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "alignscope.cli", "view", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert "127.0.0.1" in line, proc.stderr.read() if proc.poll() is not None else line
        address = line.split(" at ", 1)[1].split()[0]
        status, body, _ = _get(address)
        assert status == 200 and b"plot-planted-gap" in body
        assert (run / "report.html").is_file()  # built on demand
    finally:
        proc.terminate()
        proc.wait(timeout=30)
