"""Writes notebooks/loss_exploration.ipynb (no outputs) from notebooks/loss_exploration.md.

Edit the cells in loss_exploration.md, then run `python notebooks/build_notebook.py`;
tests/test_notebook.py checks that the stored notebook matches this script and executes it
headless.

The source is a MyST-style notebook: a line `+++` starts a markdown cell, and a code cell is a
fenced block opened by "```{code-cell} python", optionally followed by a `:tags: [a, b]` line
and a blank line. A leading HTML comment is not a cell. Cell tags: "plot" cells must leave at
least one image/png output when executed headless; "trainer" cells need `fipo_jax.rl.trainer`
(section 4) and print a labelled message without it.
"""

import pathlib

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE / "loss_exploration.md"
NOTEBOOK = HERE / "loss_exploration.ipynb"
_FENCE = "```{code-cell} python"


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
  """Cells of a MyST-style source (see the module docstring), in order."""
  if text.startswith("<!--"):
    text = text[text.index("-->") + 3 :]
  cells, lines, kind, tags = [], [], None, []

  def flush():
    source = "\n".join(lines).strip()
    if kind == "markdown" and source:
      cells.append(v4.new_markdown_cell(source))
    elif kind == "code":
      cell = v4.new_code_cell(source)
      if tags:
        cell.metadata["tags"] = list(tags)
      cells.append(cell)

  in_code = False
  for line in text.splitlines():
    if in_code:
      if line == "```":
        flush()
        in_code, kind, lines = False, None, []
      elif not lines and line.startswith(":tags:"):
        tags = [t.strip() for t in line.split("[", 1)[1].rstrip("]").split(",") if t.strip()]
      else:
        lines.append(line)
    elif line == "+++":
      flush()
      kind, lines = "markdown", []
    elif line == _FENCE:
      flush()
      in_code, kind, lines, tags = True, "code", [], []
    elif kind == "markdown":
      lines.append(line)
    elif line.strip():
      raise ValueError(f"text outside a cell in {SOURCE.name}: {line!r}")
  if in_code:
    raise ValueError(f"unclosed code cell in {SOURCE.name}")
  flush()
  return cells


def build() -> nbformat.NotebookNode:
  nb = v4.new_notebook(cells=parse_cells(SOURCE.read_text()))
  nb.metadata = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
    "colab": {"provenance": []},
  }
  # Stable cell ids keep the stored file byte-identical between builds.
  for i, cell in enumerate(nb.cells):
    cell.id = f"cell-{i:02d}"
  return nb


def main() -> None:
  nb = build()
  nbformat.validate(nb)
  nbformat.write(nb, NOTEBOOK)
  print(f"wrote {NOTEBOOK} ({len(nb.cells)} cells)")


if __name__ == "__main__":
  main()
