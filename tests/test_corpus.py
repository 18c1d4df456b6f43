"""The built-in corpora: text that ships with Python, read at run time, with their held-out parts."""

from edgegpt.corpus import STDLIB_HELD_OUT, default_eval_text, read_text


def test_pystdlib_holds_the_standard_library_without_its_held_out_packages():
    train, held = read_text("builtin:pystdlib"), read_text("builtin:pystdlib-heldout")
    assert len(train) > 2_000_000 and len(held) > 100_000
    # a line only a held-out package has is in the held-out text and not in the training text
    marker = "class JSONDecodeError(ValueError):"  # json/decoder.py
    assert "json" in STDLIB_HELD_OUT and marker in held and marker not in train
    from edgegpt.corpus import STDLIB_SKIP, _stdlib_files

    files, _ = _stdlib_files()
    assert files and not any(STDLIB_SKIP & set(f.parts) for f in files)  # no test suites, codec tables, ...
    assert any(f.parts[0] == "unittest" for f in files)  # ... but the modules they test are in


def test_pydoc_held_out_tail_is_not_calibration_text():
    from edgegpt.corpus import calibration_text

    tail = default_eval_text()
    assert tail[:2000] not in calibration_text(None)
