"""One quiet output for every command: the libraries' bars and notices only with --verbose."""

import logging
import warnings

from conftest import run_cli
from qlora.output import quiet_libraries

KERNEL_NOTICE = ("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
                 "sure you already `pip install kernels` and the kernels >= 0.11.1")


def test_library_deprecation_noise_is_quiet_and_real_warnings_stay():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "training_args.py", 1,
                               module="transformers.training_args")
        warnings.warn_explicit("your data has 3 rows", UserWarning, "prepare.py", 1, module="qlora.data.prepare")
    assert [str(w.message) for w in caught] == ["your data has 3 rows"]


def test_bitsandbytes_notice_about_a_kernel_qlora_never_uses_is_dropped_and_its_other_warnings_kept(caplog):
    # as bitsandbytes logs it while being imported, on a CPU with AVX512-BF16 (importing qlora installs the filter)
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(KERNEL_NOTICE)
        logger.warning("some other bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["some other bitsandbytes warning"]


def test_verbose_shows_the_libraries_own_output(trained_run, tmp_path):
    _, run_dir = trained_run
    runs = {flag: run_cli(f"run={run_dir}", "prompt=Is it good?", "max_new_tokens=2", *flag, cwd=tmp_path,
                          command="qlora.generate") for flag in [("--verbose",), ()]}
    assert all(run.returncode == 0 for run in runs.values()), runs
    assert "Loading weights: 100%" in runs[("--verbose",)].stderr
    assert "Loading weights" not in runs[()].stderr


def test_verbose_keeps_the_libraries_notices():
    """Which notices a library release prints changes from one release to the next (transformers 5.25 printed none
    for this command): a library's deprecation notice passes configure_output(verbose=True), and not False."""
    from qlora.output import configure_output

    shown = {}
    for verbose in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            configure_output(verbose)
            warnings.warn_explicit("`x` is deprecated", FutureWarning, "training_args.py", 1,
                                   module="transformers.training_args")
        shown[verbose] = [str(w.message) for w in caught]
    assert shown == {True: ["`x` is deprecated"], False: []}
