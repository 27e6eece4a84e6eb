"""tools/build_pdf.py: the manual holds a title page, contents, the five chapters in order, one
section per notebook, and every figure the notebooks produced."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from pypdf import PdfReader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import build_pdf  # noqa: E402
from export import notebook_paths  # noqa: E402


@pytest.fixture(scope="module")
def pdf(tmp_path_factory):
    output = tmp_path_factory.mktemp("pdf") / "book.pdf"
    build_pdf.build_pdf(ROOT, output)
    return PdfReader(output)


def notebook_title(path: Path) -> str:
    first = json.loads(path.read_text())["cells"][0]
    return "".join(first["source"]).splitlines()[0].lstrip("# ").strip()


def test_title_page_and_contents(pdf):
    first_pages = "\n".join(page.extract_text() for page in pdf.pages[:3])
    assert build_pdf.BOOK_TITLE.split("(")[0].strip() in first_pages
    assert "Contents" in first_pages


def outline(pdf) -> list:
    """The PDF's bookmarks as [(chapter title, first page, [(section title, first page), ...])]."""
    chapters, entries = [], list(pdf.outline)
    for i, entry in enumerate(entries):
        if isinstance(entry, list):
            continue
        children = entries[i + 1] if i + 1 < len(entries) and isinstance(entries[i + 1], list) else []
        sections = [(child.title, pdf.get_destination_page_number(child)) for child in children
                    if not isinstance(child, list)]
        chapters.append((entry.title, pdf.get_destination_page_number(entry), sections))
    return chapters


def test_chapters_in_order_and_a_section_per_notebook(pdf):
    # The bookmarks give the structure; the pages they point to must show the headings.
    chapters = outline(pdf)
    assert [title for title, _, _ in chapters] == [f"{n} {title}" for n, title in build_pdf.CHAPTERS.items()]
    notebooks = notebook_paths(ROOT)
    for n, (chapter_title, chapter_page, sections) in enumerate(chapters, start=1):
        expected = [f"{n}.{i} {notebook_title(path)}"
                    for i, path in enumerate((p for p in notebooks if int(p.parent.name[2:4]) == n), start=1)]
        assert [" ".join(title.split()) for title, _ in sections] == [" ".join(t.split()) for t in expected]
        pages = [chapter_page] + [page for _, page in sections]
        assert pages == sorted(pages), f"chapter {n}: sections out of page order {pages}"
        first_page = " ".join(pdf.pages[chapter_page].extract_text().split())
        assert f"Chapter {n} {build_pdf.CHAPTERS[n]}" in first_page
        for title, page in sections:
            heading = title.split(" ", 1)[1]
            assert " ".join(heading.split()) in " ".join(pdf.pages[page].extract_text().split()), (title, page)


def test_every_figure_is_in_the_pdf(pdf):
    figures = {  # distinct pictures: pandoc (and the PDF) store a repeated figure once
        output["data"]["image/png"]
        for notebook in notebook_paths(ROOT)
        for cell in json.loads(notebook.read_text())["cells"]
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    }
    assert figures

    def images_on(page) -> int:  # image objects the page draws, counted without decoding them
        resources = page.get("/Resources")
        xobjects = resources.get_object().get("/XObject") if resources else None
        return sum(xobject.get_object().get("/Subtype") == "/Image" for xobject in (xobjects or {}).values())

    assert sum(images_on(page) for page in pdf.pages) >= len(figures)


def test_pages_are_numbered(pdf):
    last_page_lines = pdf.pages[-1].extract_text().split()
    assert str(len(pdf.pages) - 1) in last_page_lines  # the title page is unnumbered


def test_old_typst_symbols_are_renamed_in_math_only():
    body = ('```python\npattern = re.compile(r"end$")\n```\n'        # a lone dollar inside code
            "so $gamma dot.circle x$ holds, `dot.circle` is code, \\$ dot.circle is text")
    fixed = build_pdf.rename_typst_symbols(body)
    assert "$gamma dot.o x$" in fixed
    assert "`dot.circle` is code" in fixed and "\\$ dot.circle is text" in fixed
    assert 'r"end$")' in fixed


def test_progress_bar_redraws_keep_only_the_last_state():
    text = "train:   0%|          | 0/400\rtrain:  50%|#####     | 200/400\rtrain: 100%|##########| 400/400\ndone\n"
    assert build_pdf.as_a_terminal_shows(text) == "train: 100%|##########| 400/400\ndone\n"


def test_stream_outputs_of_one_progress_bar_become_one_line():
    redraws = [nbformat.v4.new_output("stream", name="stderr", text=f"\rtrain: {i}/3") for i in range(4)]
    redraws.append(nbformat.v4.new_output("stream", name="stdout", text="loss 5.5\n"))
    cleaned = build_pdf.clean_outputs(redraws)
    assert [(o["name"], o["text"]) for o in cleaned] == [("stderr", "train: 3/3"), ("stdout", "loss 5.5\n")]


def test_finished_progress_bars_and_their_closing_newline_are_dropped():
    outputs = [nbformat.v4.new_output("stream", name="stderr", text="encode: 100%|██████████| 7/7 [00:03<00:00,  2.23it/s]\n"),
               nbformat.v4.new_output("stream", name="stdout", text="vocabularies: [256]\n"),
               nbformat.v4.new_output("stream", name="stderr", text="\n"),
               nbformat.v4.new_output("stream", name="stderr", text="UserWarning: kept\nrun: 200it [00:01, 150.00it/s]\n")]
    cleaned = build_pdf.clean_outputs(outputs)
    assert [(o["name"], o["text"]) for o in cleaned] == [("stdout", "vocabularies: [256]\n"), ("stderr", "UserWarning: kept\n")]


def test_absolute_value_bars_are_fenced_in_math_only():
    body = "$log \\| V \\| + \\| A inter B \\|$ and `\\| x \\|` and $f #scale(x: 180%)[\\|]_(r)$"
    assert build_pdf.rename_typst_symbols(body) == (
        "$log lr(| V |) + lr(| A inter B |)$ and `\\| x \\|` and $f #scale(x: 180%)[\\|]_(r)$")
