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
    verbose = run_cli(f"run={run_dir}", "prompt=Is it good?", "max_new_tokens=2", "--verbose", cwd=tmp_path,
                    command="qlora.generate")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "Loading weights: 100%" in verbose.stderr and "FutureWarning" in verbose.stderr
