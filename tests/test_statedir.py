"""The state directory is checked by writing into it: what fails for root fails here too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esperd.ops.statedir import StateDirError, check_state_dir, prepare_state_dir


def test_a_missing_directory_is_created_and_usable(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    check_state_dir(target)  # creatable; check creates nothing
    assert not (tmp_path / "a").exists()
    assert prepare_state_dir(target) == target and target.is_dir()
    assert list(target.iterdir()) == []  # the probe leaves nothing behind


def test_a_file_in_its_place_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_text("not a directory")
    for check in (check_state_dir, prepare_state_dir):
        with pytest.raises(StateDirError, match="not a directory") as info:
            check(target)
        assert str(target) in str(info.value) and "\n" not in str(info.value)


def test_a_path_below_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(StateDirError, match="is not a directory"):
        check_state_dir(blocker / "state")
    with pytest.raises(StateDirError, match="cannot be created"):
        prepare_state_dir(blocker / "state")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_read_only_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.mkdir()
    target.chmod(0o500)
    try:
        with pytest.raises(StateDirError, match="not writable"):
            prepare_state_dir(target)
        with pytest.raises(StateDirError, match="not writable"):
            check_state_dir(target / "sub")
    finally:
        target.chmod(0o700)


def test_a_read_only_file_system_is_refused() -> None:
    proc_sys = Path("/proc/sys")  # procfs: not writable by root either, for new files
    if not proc_sys.is_dir():
        pytest.skip("no /proc/sys")
    with pytest.raises(StateDirError):
        prepare_state_dir(proc_sys / "esperd-state")
    with pytest.raises(StateDirError):
        check_state_dir(proc_sys / "esperd-state")
