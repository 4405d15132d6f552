# SPDX-License-Identifier: Apache-2.0
"""The patch table and the ``patches`` decorator: every entry names a real patch, a patch applies once,
and each SGLang module named in the table exists in the installed SGLang (no import needed to check)."""

from __future__ import annotations

import importlib
import importlib.util
import types

import pytest

from dflash_sglang import plugin
from dflash_sglang.patches import PATCHED_MARK, patches


@pytest.mark.parametrize("sglang_module", sorted(plugin.PATCHES))
def test_every_table_entry_names_a_patch_and_an_existing_sglang_module(sglang_module):
    module_name, function = plugin.PATCHES[sglang_module].split(":")
    patch = getattr(importlib.import_module(f"dflash_sglang.patches.{module_name}"), function)
    assert callable(patch) and patch.__doc__, f"{plugin.PATCHES[sglang_module]} needs a docstring"
    assert importlib.util.find_spec(sglang_module) is not None, f"SGLang has no {sglang_module}"


def test_a_patch_applies_once_and_marks_its_target():
    calls = []

    class Target:
        def greet(self) -> str:
            return "hello"

    @patches(lambda module: module.Target)
    def patch_target(cls) -> None:
        """Wraps Target.greet."""
        calls.append(cls)
        original = cls.greet
        cls.greet = lambda self: original(self) + ", DFLASH"

    module = types.ModuleType("fake_sglang_module")
    module.Target = Target
    patch_target(module)
    patch_target(module)
    assert calls == [Target] and vars(Target)[PATCHED_MARK] is True
    assert Target().greet() == "hello, DFLASH"
    assert patch_target.__doc__ == "Wraps Target.greet."


def test_a_subclass_of_a_patched_class_is_patched_on_its_own():
    class Base:
        pass

    class Child(Base):
        pass

    patched = []
    patch_base = patches(lambda module: module.Base)(patched.append)
    patch_child = patches(lambda module: module.Child)(patched.append)
    module = types.SimpleNamespace(Base=Base, Child=Child)
    patch_base(module)
    patch_child(module)  # the mark Child inherits from Base must not stop its own patch
    assert patched == [Base, Child]
