"""Sphinx configuration: the Markdown pages of docs/ (MyST) and the API reference (autodoc)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout, installed or not

import padam_jax  # noqa: E402

project = "padam_jax"
author = "padam_jax contributors"
copyright = "padam_jax contributors"
release = padam_jax.__version__
version = release

extensions = [
  "myst_parser",
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: GitHub-style heading anchors, so that links like trainers.md#data work on GitHub and here.
myst_heading_anchors = 3

# Docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_type_aliases = {"ScalarOrSchedule": "ScalarOrSchedule"}

html_theme = "furo"
html_title = f"padam_jax {release}"

# The pages link to committed results elsewhere in the repository (benchmarks/results/*.md). Those
# links work on GitHub as written; in the built HTML they point to the same file on GitHub.
REPOSITORY = "https://github.com/padam-jax/padam_jax"


def _link_repository_files(app, doctree):
  from docutils import nodes
  from sphinx import addnodes

  docs = pathlib.Path(app.srcdir).resolve()
  for node in list(doctree.findall(addnodes.pending_xref)):
    if node.get("reftype") != "myst" or node.get("refdomain") != "doc":
      continue
    target = pathlib.Path(node["reftarget"])
    if not target.is_absolute() or target.is_relative_to(docs) or not target.is_relative_to(ROOT):
      continue
    path = target.relative_to(ROOT).with_suffix(".md")
    anchor = f"#{node['reftargetid']}" if node.get("reftargetid") else ""
    uri = f"{REPOSITORY}/blob/main/{path.as_posix()}{anchor}"
    node.replace_self(nodes.reference("", "", *node.children, refuri=uri, internal=False))


def setup(app):
  app.connect("doctree-read", _link_repository_files)
