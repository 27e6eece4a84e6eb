"""Build the book's PDF reference manual from executed notebooks, offline.

    python tools/build_pdf.py                     from the committed notebooks (seconds)
    python tools/build_pdf.py --source build/book from the notebooks `make book` just executed

Pipeline: all notebooks are merged into one notebook (chapter headings added, each notebook's own
headings moved one level down so it becomes a section), pandoc turns it into typst, and the typst
compiler writes the PDF. pandoc comes from the `pypandoc-binary` wheel and typst from the `typst`
wheel, so no system packages and no network are needed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pypandoc
import typst

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export import ROOT, chapter_of, notebook_paths  # noqa: E402

BOOK_TITLE = "Build a Large Language Model (from Scratch)"
BOOK_SUBTITLE = "The executable companion — reference manual"
CHAPTERS = {
    1: "Foundations",
    2: "Data Engineering",
    3: "Model Code",
    4: "Distributed Training",
    5: "Evaluation",
}
OUTPUT = ROOT / "build" / "llm-from-scratch.pdf"

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
FENCE = re.compile(r"^\s*(```|~~~)")
SOLUTION_OPEN = re.compile(r"<details>\s*<summary>(.*?)</summary>", re.IGNORECASE)
# A finished tqdm bar: "desc: 100%|█████| 7/7 [00:03<00:00,  2.23it/s, loss=1.2]" or, without a
# total, "desc: 200it [00:01, 150.00it/s]". Its timings differ on every run and say nothing on paper.
TQDM_BAR = re.compile(r"^.*?(\d+%\|.*\|\s*[\d.]+[kMG]?/[\d.]+[kMG]?|\d+(?:[a-zA-Z]+)?)"
                      r" \[\d+:\d+(?::\d+)?(?:<[^,\]]*)?(?:, [^\]]*)?\]\s*$")

# pandoc still writes a few math symbol names that typst 0.14 renamed; fixed inside $…$ only.
TYPST_SYMBOL_RENAMES = {"dot.circle": "dot.o", "plus.circle": "plus.o", "times.circle": "times.o",
                        "minus.circle": "minus.o", "sect": "inter", "sect.big": "inter.big"}
# Raw code (fenced blocks, inline `code`) and escaped characters are skipped, so a dollar sign in
# code can never pair up with one that opens math.
TYPST_RAW_OR_MATH = re.compile(r"(?P<raw>(?P<fence>`{3,})[\s\S]*?(?P=fence)|`[^`\n]*`|\\.)"
                               r"|(?P<math>\$(?:[^$\\]|\\.)*\$)")
# pandoc writes |x| (absolute value, size of a set) as `\| x \|`: two lone bars, which typst spaces
# like relations ("| V | × | V |"). Inside math they become one fenced `lr(| x |)`. A bar that is
# scaled on its own (`#scale(...)[\|]`, an evaluation bar) has no partner and is left alone.
ABS_BARS = re.compile(r"(?<!\[)\\\| ((?:(?!\\\|)[^$])+?) \\\|(?!\])")
OLD_SYMBOL = re.compile(r"(?<![\w.])(%s)(?![\w.])" % "|".join(
    re.escape(name) for name in sorted(TYPST_SYMBOL_RENAMES, key=len, reverse=True)))


# pandoc gives a pipe table's columns fixed shares of the width, taken from the lengths of the
# `|---|` dashes, which in the notebooks are arbitrary; a two-word column then wraps while a
# sentence column has room to spare. typst's `auto` columns share the width by content instead.
TABLE_COLUMNS = re.compile(r"^(\s*columns: )\(((?:[\d.]+%,? ?)+)\),$", re.MULTILINE)


def auto_table_columns(body: str) -> str:
    return TABLE_COLUMNS.sub(lambda m: m.group(1) + "(" + ", ".join(["auto"] * m.group(2).count("%")) + "),", body)


# matplotlib figures are PNGs at 100 pixels per inch, cropped to their content, 5 to 13 inches wide.
# One width for all would print a wide figure's labels at half the size of a narrow one's; instead
# each is printed at its width in pixels / FULL_WIDTH_PIXELS of the text width (at most all of it,
# at least MIN_SHARE), so that their lettering comes out at nearly one size.
FULL_WIDTH_PIXELS = 1000
MIN_SHARE = 0.55
PNG_IMAGE = re.compile(r'image\("(media/[^"]+\.png)"\)')


def sized_figures(body: str, root: Path) -> str:
    def sized(match: re.Match) -> str:
        with open(root / match.group(1), "rb") as png:
            width = int.from_bytes(png.read(24)[16:20], "big")  # the IHDR chunk's width
        share = min(1.0, max(MIN_SHARE, width / FULL_WIDTH_PIXELS))
        return f'image("{match.group(1)}", width: {share:.0%})'
    return PNG_IMAGE.sub(sized, body)


def rename_typst_symbols(body: str) -> str:
    """Replace old symbol names, and pairs of bars with `lr(| … |)`, inside math only, so prose and
    code that mention them are untouched."""
    def fix_math(match: re.Match) -> str:
        if match.group("math") is None:
            return match.group(0)
        math = OLD_SYMBOL.sub(lambda old: TYPST_SYMBOL_RENAMES[old.group(1)], match.group("math"))
        return ABS_BARS.sub(r"lr(| \1 |)", math)
    return TYPST_RAW_OR_MATH.sub(fix_math, body)


# pandoc wraps every notebook cell in a Div; page breaks cannot happen inside the resulting typst
# blocks, so long cells would overflow. Unwrapping them (and dropping the auto-generated heading
# labels, which repeat across notebooks) leaves plain flowing content.
# A paragraph that is only a short italic lead-in ("Solution.", from print_solutions) introduces
# what follows, so it must not be left alone at the foot of a page: it becomes a sticky block.
LUA_FILTER = """
function Div(el) return el.content end
function Header(el) el.identifier = "" return el end
function Para(el)
  if #el.content == 1 and el.content[1].t == "Emph" then
    local text = pandoc.utils.stringify(el.content[1])
    if #text <= 40 and text:sub(-1) == "." then
      local body = pandoc.write(pandoc.Pandoc({pandoc.Plain(el.content)}), "typst")
      return pandoc.RawBlock("typst", "#block(sticky: true)[" .. body:gsub("%s+$", "") .. "]")
    end
  end
end
"""

PREAMBLE = r"""
#set document(title: "%(title)s")
#set text(font: ("Libertinus Serif", "New Computer Modern"), size: 10.5pt, lang: "en")
#set par(justify: true)
// pandoc's +smart leaves quotes to typst: they stay straight, as in the notebooks and the outline.
#set smartquote(enabled: false)
#set heading(numbering: "1.1")
#set image(width: 72%%)  // a default: each figure's width is set from its size (sized_figures)
#set page(margin: (x: 1.9cm, y: 2.2cm))
// The notebooks' code lines run to about 110 characters: at 7pt, 112 fit across the page. A block
// with longer lines (wide printed tables, long calls) is set smaller, down to 6pt (131 characters),
// so that its lines fit; a line longer than that still wraps, and its continuation is indented
// past the line's own indentation, so it cannot be mistaken for a new line of code or output.
// Code inside a sentence stays at a size that reads with the text.
#let code-fit = 112
#let code-fit-min = 131
#show raw: set text(font: "DejaVu Sans Mono", size: 8.5pt)
#show raw.where(block: true): it => {
  let lengths = it.lines.map(line => line.text.clusters().len())
  let longest = calc.max(0, ..lengths.filter(n => n <= code-fit-min))
  set text(size: if longest > code-fit { 7pt * code-fit / longest } else { 7pt })
  set par(justify: false)
  block(
    width: 100%%, inset: 7pt, radius: 3pt, breakable: true,
    fill: if it.lang == none { white } else { luma(244) },
    stroke: if it.lang == none { (left: 2pt + luma(200)) } else { none },
    for line in it.lines {
      let indent = line.text.len() - line.text.trim(at: start).len()
      block(spacing: par.leading, par(hanging-indent: (indent + 4) * 0.6021em,
        if line.text == "" { sym.zws } else { line }))
    },
  )
}
// Tables: ragged cells in a slightly smaller size (justified narrow cells open wide gaps), bold
// header row. Their columns are sized by content (see TABLE_COLUMNS).
#show table: set par(justify: false)
#show table: set text(size: 9.5pt)
#show table.cell.where(y: 0): strong
#show heading.where(level: 1, outlined: true): it => {
  pagebreak(weak: true)
  v(2.5cm)
  text(size: 13pt, fill: luma(90))[Chapter #counter(heading).display("1")]
  v(0.2cm)
  text(size: 24pt, weight: "bold", it.body)
  v(1cm)
}
#show heading.where(level: 2): it => { v(0.8cm); it; v(0.3cm) }

#page(numbering: none)[
  #v(6cm)
  #align(center)[
    #text(size: 26pt, weight: "bold")[%(title)s]
    #v(0.6cm)
    #text(size: 14pt)[%(subtitle)s]
    #v(2cm)
    #text(size: 11pt, fill: luma(90))[Five chapters of executable notebooks:\ %(chapters)s]
  ]
]
#set page(numbering: "1", number-align: center)
#counter(page).update(1)
#outline(title: [Contents], depth: 2, indent: auto)
"""


def demote_headings(markdown: str) -> str:
    """Move every markdown heading one level down (outside fenced code), so a notebook's title
    becomes a section of its chapter."""
    lines, in_fence = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,5} ", line):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines)


def print_solutions(markdown: str) -> str:
    """Solutions hide in <details> blocks in JupyterLab; pandoc drops raw HTML blocks with their
    content, so on paper they become a plain 'Solution.' paragraph."""
    markdown = SOLUTION_OPEN.sub(lambda m: f"*{m.group(1).strip()}.*", markdown)
    return re.sub(r"</details>", "", markdown, flags=re.IGNORECASE)


def as_a_terminal_shows(text: str) -> str:
    """Progress bars redraw their line with carriage returns; keep only each line's last state."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def without_progress_bars(text: str) -> str:
    """Drop the lines that are (the final state of) a tqdm progress bar."""
    return "".join(line for line in text.splitlines(keepends=True) if not TQDM_BAR.match(line.rstrip("\n")))


def clean_outputs(outputs: list) -> list:
    """Outputs as a reader should see them on paper: progress bars only in their last state and
    then dropped (with the bare newline tqdm writes when it closes), escape codes stripped,
    tracebacks as text, no text/plain twin of a figure."""
    kept = clean_streams(outputs)
    for out in kept:
        if out.get("output_type") == "stream" and out["name"] == "stderr":
            out["text"] = without_progress_bars(out["text"]).lstrip("\n")
    return [out for out in kept if out.get("output_type") != "stream" or out["text"].strip()]


def clean_streams(outputs: list) -> list:
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream":
            previous = kept[-1] if kept else None
            if previous is not None and previous.get("output_type") == "stream" and previous["name"] == out["name"]:
                # a progress bar arrives as one stream output per redraw: join them, then redraw
                previous["text"] = as_a_terminal_shows(previous["text"] + ANSI_ESCAPE.sub("", out["text"]))
                continue
            out["text"] = as_a_terminal_shows(ANSI_ESCAPE.sub("", out["text"]))
        elif any(kind.startswith("image/") for kind in out.get("data", {})):
            # a figure also carries a text/plain '<Figure size …>' that pandoc would print too
            out["data"] = {k: v for k, v in out["data"].items() if k.startswith("image/")}
        elif out.get("output_type") == "error":
            out = nbformat.v4.new_output(
                "stream", name="stderr",
                text=ANSI_ESCAPE.sub("", "\n".join(out.get("traceback", []))))
        kept.append(out)
    return kept


def merge(notebooks: list[Path]) -> nbformat.NotebookNode:
    """One notebook holding the whole book, chapter by chapter."""
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    cells = book.cells
    for number, title in CHAPTERS.items():
        cells.append(nbformat.v4.new_markdown_cell(f"# {title}"))
        chapter = [nb for nb in notebooks if chapter_of(nb) == number]
        if not chapter:
            cells.append(nbformat.v4.new_markdown_cell("*This chapter is coming.*"))
        for path in chapter:
            for cell in nbformat.read(path, as_version=4).cells:
                if cell.cell_type == "markdown":
                    text = nbformat.v4.new_markdown_cell(print_solutions(demote_headings(cell.source)))
                    if cell.get("attachments"):
                        text.attachments = cell.attachments
                    cells.append(text)
                elif cell.cell_type == "code" and cell.source.strip():
                    code = nbformat.v4.new_code_cell(cell.source)
                    code.outputs = clean_outputs(cell.outputs)
                    code.execution_count = cell.execution_count
                    cells.append(code)
    for i, cell in enumerate(cells):  # unique ids: pandoc rejects a merged book with repeats
        cell.id = f"cell-{i}"
    return book


def build_pdf(source: Path, output: Path = OUTPUT) -> Path:
    notebooks = notebook_paths(source)
    if not notebooks:
        raise SystemExit(f"No notebooks found under {source} (expected chNN_*/NN_*.ipynb).")
    work = output.parent / "pdf"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    merged = work / "book.ipynb"
    nbformat.write(merge(notebooks), merged)
    lua = work / "unwrap.lua"
    lua.write_text(LUA_FILTER, encoding="utf-8")

    # Run in the work folder so extracted figures get paths relative to typst's root.
    body = subprocess.run(
        # +smart: prose "--" and "---" print as dashes (without it pandoc escapes them and a reader
        # sees "a -- b"); code is never touched.
        [pypandoc.get_pandoc_path(), merged.name, "--from=ipynb+smart", "--to=typst",
         f"--lua-filter={lua.name}", "--extract-media=media", "--wrap=preserve"],
        cwd=work, check=True, capture_output=True, text=True,
    ).stdout
    body = sized_figures(auto_table_columns(rename_typst_symbols(body)), work)
    preamble = PREAMBLE % {
        "title": BOOK_TITLE,
        "subtitle": BOOK_SUBTITLE,
        "chapters": " · ".join(f"{n}. {t}" for n, t in CHAPTERS.items()),
    }
    main_typ = work / "book.typ"
    main_typ.write_text(preamble + "\n" + body, encoding="utf-8")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        typst.compile(str(main_typ), output=str(output), root=str(work))
    except typst.TypstError as err:
        raise SystemExit(f"typst could not compile {main_typ}:\n{err.diagnostic or err.message}") from err
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="folder holding the chNN_* chapter folders (default: the repository)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    pdf = build_pdf(args.source.resolve(), args.output.resolve())
    print(f"wrote {pdf.relative_to(ROOT) if pdf.is_relative_to(ROOT) else pdf} "
          f"({pdf.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
