"""kvmkit.entry_points: the metadata reader that replaces importlib.metadata at start-up."""
import importlib.metadata
import sys

import pytest

from kvmkit import entry_points


def dist(folder, name, version, eps: str, *, info="dist-info", meta="METADATA"):
    d = folder / f"{name.replace('-', '_')}-{version}.{info}"
    d.mkdir(parents=True)
    (d / meta).write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nName: not-a-header\n")
    (d / "entry_points.txt").write_text(eps)
    return d


@pytest.fixture
def path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    entry_points.forget()


def test_reads_groups_names_values_and_the_distribution(path):
    dist(path, "kvmkit-thing", "1.2", "# a comment\n[kvmkit.devices]\nthing = thing_mod:plugin\n"
         "; another\nother = other_mod\n\n[console_scripts]\nthing = thing_mod:main\n")
    eps = {ep.name: ep for ep in entry_points.group("kvmkit.devices")}
    assert eps["thing"].value == "thing_mod:plugin" and eps["other"].value == "other_mod"
    assert eps["thing"].group == "kvmkit.devices"
    assert eps["thing"].dist.name == "kvmkit-thing" and eps["thing"].dist.version == "1.2"
    assert [ep.value for ep in entry_points.group("console_scripts") if ep.name == "thing"] == ["thing_mod:main"]


def test_load_imports_the_module_and_follows_the_attribute_path(path):
    (path / "ep_target_mod.py").write_text("class A:\n    class B:\n        x = 7\n")
    dist(path, "ep-target", "1", "[g.test]\nab = ep_target_mod:A.B [extra]\nmod = ep_target_mod\n")
    sys.modules.pop("ep_target_mod", None)
    eps = {ep.name: ep for ep in entry_points.group("g.test")}
    assert eps["ab"].load().x == 7
    assert eps["mod"].load() is sys.modules["ep_target_mod"]


def test_the_first_distribution_of_a_name_on_the_path_wins(path, monkeypatch):
    later = path / "later"
    dist(path / "first", "dup-dist", "2.0", "[g.dup]\nx = first:x\n")
    dist(later, "dup_dist", "1.0", "[g.dup]\nx = later:x\ny = later:y\n")
    monkeypatch.syspath_prepend(str(later))
    monkeypatch.syspath_prepend(str(path / "first"))
    assert [(ep.name, ep.value) for ep in entry_points.group("g.dup")] == [("x", "first:x")]


def test_egg_info_folders_and_pkg_info_are_read(path):
    dist(path, "old-style", "0.3", "[g.egg]\nz = z_mod:z\n", info="egg-info", meta="PKG-INFO")
    [ep] = entry_points.group("g.egg")
    assert (ep.value, ep.dist.name, ep.dist.version) == ("z_mod:z", "old-style", "0.3")


def test_a_folder_added_to_the_path_is_seen_without_forget(tmp_path, monkeypatch):
    assert entry_points.group("g.late") == []
    dist(tmp_path, "late-dist", "1", "[g.late]\nl = l_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [ep.name for ep in entry_points.group("g.late")] == ["l"]
    entry_points.forget()


@pytest.mark.parametrize("group", ["kvmkit.devices", "kvmkit.queues", "console_scripts"])
def test_agrees_with_importlib_metadata_on_this_environment(group):
    entry_points.forget()
    ours = sorted((ep.name, ep.value, ep.dist.name, ep.dist.version) for ep in entry_points.group(group))
    theirs = sorted({(ep.name, ep.value, ep.dist.name, ep.dist.version)
                     for ep in importlib.metadata.entry_points(group=group)})
    assert ours == theirs
