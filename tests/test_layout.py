"""The project's layout (README "What is in the box"): flat top-level modules, each opening with a
docstring, none over 400 lines, no import cycle among them (of any length), the method files in lines of
at most 100 characters, and every citation in the code resolving inside the repository."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 400
METHOD_FILES = ("lorad.py", "vsd.py", "checkpoint.py", "ddp.py", "diffusion.py")  # read beside the paper
# what a reader of the repository does not have: the project's internal notes and issue tracker
OUTSIDE = re.compile(r"\bSPEC\b|\.\./shared|\breference/[a-z-]+\.md|\breference [A-Z]\.[0-9]|\bissue [0-9]+")


def top_level_modules():
    return {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}


def imports_of(path, modules):
    """The project modules that `path` imports (anywhere in the file, also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return {n for n in names if n in modules}


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    modules = top_level_modules()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_sees_long_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_modules_are_small_and_say_what_they_are():
    for name, path in sorted(top_level_modules().items()):
        source = open(path, encoding="utf-8").read()
        assert source.count("\n") <= MAX_LINES, f"{name}.py has {source.count(chr(10))} lines (at most {MAX_LINES})"
        assert ast.get_docstring(ast.parse(source)), f"{name}.py opens without a docstring"


def test_method_files_keep_lines_short():
    for name in METHOD_FILES:
        long = [i for i, line in enumerate(open(os.path.join(ROOT, name), encoding="utf-8"), 1)
                if len(line.rstrip("\n")) > 100]
        assert not long, f"{name}: lines over 100 characters: {long}"


def python_files():
    return sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
                  + glob.glob(os.path.join(ROOT, "bench", "*.py")))


def test_citations_resolve_inside_the_repository():
    for path in python_files():
        text = open(path, encoding="utf-8").read()
        name = os.path.relpath(path, ROOT)
        assert not OUTSIDE.search(text), f"{name} cites {OUTSIDE.search(text).group()!r}: cite the paper or docs/"
        for doc in set(re.findall(r"\bdocs/[A-Za-z0-9_-]+\.md", text)):
            assert os.path.isfile(os.path.join(ROOT, doc)), f"{name} cites {doc}, which does not exist"


def test_the_citation_check_sees_what_it_must():
    # the examples are put together from pieces, so that no line of this file is itself such a citation
    assert OUTSIDE.search("see ../sha" + "red/" + "reference/pixart-t5.md D.5")
    assert OUTSIDE.search("(SP" + "EC 1.3)") and OUTSIDE.search("(iss" + "ue 14)")
    assert OUTSIDE.search("reference A" + ".5")
    assert not OUTSIDE.search("the reference implementation (diffusers)") and not OUTSIDE.search("SPECIAL")
