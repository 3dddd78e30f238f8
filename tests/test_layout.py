"""The project's layout (README "What is in the box"): flat top-level modules, each opening with a
docstring, none over 500 lines, and no import cycle among them (of any length)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500


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
