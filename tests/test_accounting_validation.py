"""Bad inputs to every validated parameter of the library functions, and the torch-free import."""

import math
import subprocess
import sys

import numpy as np
import pytest

from lap2_hf.accounting import (
    NOISE_MAX,
    calibrate_noise,
    compute_rdp,
    epsilon_for,
    log_F,
    noise_scale,
    rdp_gaussian,
    rdp_lap2,
    rdp_laplace,
    rdp_to_epsilon,
    steps_for_epochs,
)

CAL = dict(mechanism="lap2", target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100, dim=1000)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(sample_rate=-0.1), "sample_rate"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(sample_rate=math.nan), "sample_rate"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=-1e-5), "delta"),
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(target_epsilon=math.inf), "target_epsilon"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=None), "steps or epochs"),
        (dict(epochs=3.0), "steps or epochs"),
        (dict(steps=None, epochs=0.0), "epochs"),
        (dict(steps=None, epochs=-1.0), "epochs"),
        (dict(steps=None, epochs=3.0, num_examples=0), "num_examples"),
        (dict(num_examples=1.5), "num_examples"),
        (dict(dim=0), "dim"),
        (dict(dim=0.5), "dim"),
        (dict(dim=12.5), "dim"),
        (dict(dim=None), "dim"),
        (dict(mechanism="none"), "mechanism"),
        (dict(mechanism="Gaussian"), "mechanism"),
        (dict(orders=(2, 2.5)), "orders"),
        (dict(tol=0.0), "tol"),
    ],
)
def test_calibrate_bad_inputs(override, field):
    with pytest.raises(ValueError, match=field):
        calibrate_noise(**{**CAL, **override})


def test_calibrate_unreachable():
    with pytest.raises(ValueError, match=r"unreachable.*tried noise.*1e\+06"):
        calibrate_noise(**{**CAL, "target_epsilon": 1e-5})
    assert NOISE_MAX == 1e6


def test_calibrate_epochs_equivalent_to_steps():
    a = calibrate_noise(**{**CAL, "steps": None, "epochs": 1.0, "num_examples": 10_000})
    b = calibrate_noise(**CAL)  # 1 epoch at q = 0.01 is 100 steps
    assert a == b


def test_calibrate_very_loose_target():
    noise = calibrate_noise(mechanism="gaussian", target_epsilon=1e14, delta=1e-5, sample_rate=1.0, steps=1)
    assert 0 < noise < 2e-6


def test_steps_for_epochs():
    assert steps_for_epochs(epochs=3, sample_rate=0.03) == 100  # not 101 from float rounding
    assert steps_for_epochs(epochs=1, sample_rate=0.3) == 4  # ceil(3.33)
    assert steps_for_epochs(epochs=0.001, sample_rate=0.5) == 1
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(epochs=math.inf, sample_rate=0.5)


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(noise=0.0), "noise"),
        (dict(noise=-1.0), "noise"),
        (dict(noise=math.nan), "noise"),
        (dict(delta=2.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(dim=0), "dim"),
        (dict(dim=None), "dim"),
        (dict(mechanism="none"), "mechanism"),
    ],
)
def test_epsilon_for_bad_inputs(override, field):
    kw = dict(mechanism="lap2", noise=1.0, delta=1e-5, sample_rate=0.01, steps=10, dim=10)
    with pytest.raises(ValueError, match=field):
        epsilon_for(**{**kw, **override})


def test_rdp_functions_bad_inputs():
    with pytest.raises(ValueError, match="sample_rate"):
        rdp_gaussian(sample_rate=0.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        rdp_gaussian(sample_rate=0.1, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="noise_to_clip"):
        rdp_laplace(sample_rate=0.1, noise_to_clip=-1.0)
    with pytest.raises(ValueError, match="dim"):
        rdp_lap2(sample_rate=0.1, noise_to_clip=1.0, dim=0)
    for bad in [(2, 3.5), (0,), (1,), (2, math.inf), (), [[2, 3]], ("a",), (True,)]:
        with pytest.raises(ValueError, match="order"):
            rdp_gaussian(sample_rate=0.1, noise_multiplier=1.0, orders=bad)
    with pytest.raises(TypeError):
        rdp_gaussian(0.1, 1.0)  # keyword-only
    with pytest.raises(TypeError):
        compute_rdp("gaussian")
    with pytest.raises(ValueError, match="eta"):
        log_F(1.0, 2.5)
    with pytest.raises(ValueError, match="eta"):
        log_F(1.0, -1)
    with pytest.raises(ValueError, match="t must"):
        log_F(-1.0, 2)
    with pytest.raises(ValueError, match="t must"):
        log_F(math.nan, 2)


def test_rdp_to_epsilon_bad_inputs_and_basics():
    orders = (2, 3, 4)
    with pytest.raises(ValueError, match="delta"):
        rdp_to_epsilon([0.1, 0.1, 0.1], orders=orders, delta=0.0)
    with pytest.raises(ValueError, match="orders"):
        rdp_to_epsilon([0.1, 0.1, 0.1], orders=(2, 3, 4.5), delta=1e-5)
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon([0.1, 0.1], orders=orders, delta=1e-5)
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon([0.1, -0.1, 0.1], orders=orders, delta=1e-5)
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon([0.1, math.nan, 0.1], orders=orders, delta=1e-5)
    # Hand-computed Balle et al. conversion at a single order.
    eps, order = rdp_to_epsilon([0.5], orders=(10,), delta=1e-5)
    assert order == 10
    assert eps == pytest.approx(0.5 + math.log(0.9) - (math.log(1e-5) + math.log(10)) / 9, rel=1e-14)
    # Clamped at 0; infinite RDP at some orders is fine.
    assert rdp_to_epsilon([0.0], orders=(2,), delta=0.9) == (0.0, 2)
    eps, order = rdp_to_epsilon([np.inf, 0.1, np.inf], orders=orders, delta=1e-5)
    assert order == 3 and math.isfinite(eps)


def test_noise_scale():
    assert noise_scale(noise=1.5, clip_norm=0.4) == pytest.approx(0.6)
    for bad in (0.0, -0.4, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip_norm"):
            noise_scale(noise=1.0, clip_norm=bad)
    with pytest.raises(ValueError, match="noise"):
        noise_scale(noise=0.0, clip_norm=1.0)


def test_import_is_torch_free():
    code = (
        "import sys, lap2_hf.accounting as a\n"
        "a.epsilon_for(mechanism='lap2', noise=1.0, delta=1e-5, sample_rate=0.01, steps=10, dim=100)\n"
        "import lap2_hf.cli\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'dp_accounting' not in sys.modules, 'dp_accounting imported eagerly'\n"
        "a.laplace_epsilon_pld(noise_to_clip=1.0, sample_rate=0.5, steps=2, delta=1e-5)\n"
        "assert 'torch' not in sys.modules, 'torch imported by dp_accounting'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
