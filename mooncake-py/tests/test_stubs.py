"""The type stubs (store.pyi) describe the module that is really there, and nothing else."""

import ast
import pathlib

import mooncake.store as store

STUB = pathlib.Path(store.__file__).with_suffix(".pyi")


def stub_tree():
    return ast.parse(STUB.read_text(), filename=str(STUB))


def stub_names():
    """Top-level names and, per class, member names declared in the stub."""
    top, members = set(), {}
    for node in stub_tree().body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            top.add(node.name)
        elif isinstance(node, ast.ClassDef):
            top.add(node.name)
            names = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
            members[node.name] = names
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
        elif isinstance(node, ast.Assign):
            top.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return top, members


def test_every_stub_name_exists_in_the_module():
    top, members = stub_names()
    # Private names (type aliases like `_Bytes`) exist only in the stub.
    missing = sorted(n for n in top if not n.startswith("_") and not hasattr(store, n))
    assert not missing, f"declared in store.pyi but missing at runtime: {missing}"
    for cls, names in members.items():
        obj = getattr(store, cls)
        absent = sorted(n for n in names if not n.startswith("__") and not hasattr(obj, n))
        assert not absent, f"{cls}: declared in the stub but missing: {absent}"


def test_every_public_name_is_in_the_stub():
    top, members = stub_names()
    public = set(store.__all__)
    undeclared = sorted(public - top)
    assert not undeclared, f"public in mooncake.store but not in store.pyi: {undeclared}"
    api = {
        n
        for n in dir(store.MooncakeDistributedStore)
        if not n.startswith("_") and callable(getattr(store.MooncakeDistributedStore, n))
    }
    undeclared = sorted(api - members["MooncakeDistributedStore"])
    assert not undeclared, f"MooncakeDistributedStore methods missing from the stub: {undeclared}"
