"""Issue 18, volumes: values that become non-finite only after scaling, absurd spacings, and nibabel's own
log lines, all at the loader (``load_ct`` / ``load_labels``) that every command goes through.
"""

from __future__ import annotations

import logging
import warnings

import nibabel as nib
import numpy as np
import pytest

from kitsseg.errors import InvalidImageError
from kitsseg.evaluation.phantom import make_phantom
from kitsseg.io.frame import MAX_SPACING_MM, MIN_SPACING_MM, VolumeWarning, quiet_nibabel
from kitsseg.io.load import load_ct, load_labels
from kitsseg.io.save import write_frame
from robustness import SHAPE, SPACING


def _int16_ct(tmp_path, slope: float, inter: float = 0.0, name: str = "ct.nii.gz"):
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    img = nib.Nifti1Image(np.round(ct).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])  # the streamed and the nibabel reading paths
@pytest.mark.parametrize(("slope", "inter"), [(1e38, 0.0), (-1e38, 0.0), (1e37, 1e38), (1e36, 0.0)])
def test_values_that_overflow_only_after_scaling_are_refused(tmp_path, name, slope, inter) -> None:
    path = _int16_ct(tmp_path, slope, inter, name)
    with pytest.raises(InvalidImageError, match="beyond what float32 holds"):
        load_ct(path)
    with pytest.raises(InvalidImageError, match="beyond what float32 holds"):
        load_ct(path, keep_int16=True)


def test_large_but_finite_scaling_still_loads(tmp_path) -> None:
    path = _int16_ct(tmp_path, 1e30)  # HU up to about 3e33: absurd, but finite and warned about, not refused
    data = load_ct(path).data
    assert np.isfinite(data).all()


@pytest.mark.parametrize("spacing", [(1e30, 0.8, 0.8), (2.5, 150.0, 0.8), (2.5, 0.8, 1e6)])
def test_absurd_spacing_is_refused(tmp_path, spacing) -> None:
    ct, labels = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=spacing)
    with pytest.raises(InvalidImageError, match=f"more than {MAX_SPACING_MM:g} mm between voxels"):
        load_ct(path)
    label_path = write_frame(labels.astype(np.uint8), tmp_path / "gt.nii.gz", spacing=spacing)
    with pytest.raises(InvalidImageError, match="voxel spacing"):
        load_labels(label_path)


@pytest.mark.parametrize("spacing", [(1e-7, 0.8, 0.8), (0.0025, 0.0008, 0.0008)])
def test_tiny_spacing_is_refused(tmp_path, spacing) -> None:
    # 1e-7 mm between slices made segment hang (bridging reach); 0.0008 is a header written in metres
    ct, labels = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=spacing)
    with pytest.raises(InvalidImageError, match=f"less than {MIN_SPACING_MM:g} mm between voxels"):
        load_ct(path)
    label_path = write_frame(labels.astype(np.uint8), tmp_path / "gt.nii.gz", spacing=spacing)
    with pytest.raises(InvalidImageError, match="voxel spacing"):
        load_labels(label_path)


def test_fine_but_real_spacing_loads(tmp_path) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=(0.5, 0.2, 0.2))
    assert load_ct(path).spacing == pytest.approx((0.5, 0.2, 0.2))


def test_coarse_but_real_spacing_loads(tmp_path) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=(10.0, 2.0, 2.0))
    assert load_ct(path).spacing == pytest.approx((10.0, 2.0, 2.0))


@pytest.mark.parametrize(
    ("qform", "expected"),
    [
        (np.diag([3.0, 3.0, 3.0, 1.0]), "voxel size 3 x 3 x 3 vs 0.8 x 0.8 x 2.5 mm"),
        (np.diag([-0.8, -0.8, 2.5, 1.0]), "axes LPS vs RAS"),
    ],
)
def test_qform_and_sform_that_disagree_warn(tmp_path, qform, expected) -> None:
    """Both coded, placing the voxels differently: kitsseg (nibabel) reads the sform, ITK tools may read
    the qform, so the mask may not be where the user's viewer puts the CT. It loaded without a word."""
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    img = nib.Nifti1Image(ct, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.set_qform(qform, code=1)
    img.set_sform(np.diag([0.8, 0.8, 2.5, 1.0]), code=1)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    with pytest.warns(VolumeWarning, match=r"qform and an sform that disagree") as caught:
        vol = load_ct(path)
    assert vol.spacing == pytest.approx((0.8, 0.8, 2.5)[::-1])  # the sform's, in the (z, row, col) frame
    assert any(expected in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_qform_and_sform_that_agree_do_not_warn(tmp_path) -> None:
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    path = write_frame(ct, tmp_path / "ct.nii.gz", spacing=SPACING, layout="ras")  # both coded, equal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_ct(path)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_nibabel_log_lines_are_silenced_while_loading(tmp_path) -> None:
    """nibabel's handler writes to the stderr it saw when imported, so the records are caught on the
    logger itself here; the CLI matrix row header-fixed-by-nibabel checks the real stderr of a run."""
    ct, _ = make_phantom(SHAPE, SPACING, seed=1, noise_hu=1.0)
    img = nib.Nifti1Image(ct, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header["pixdim"][1] = -0.8  # nibabel fixes this on load and logs it on its own stderr handler
    path = tmp_path / "ct.nii.gz"
    nib.save(img, str(path))
    logger = logging.getLogger("nibabel.global")
    records = _Records()
    logger.addHandler(records)
    try:
        nib.load(str(path))
        assert any("pixdim" in m for m in records.messages)  # what users saw beside kitsseg's own line
        records.messages.clear()
        level = logger.level
        load_ct(path)
        assert records.messages == []
    finally:
        logger.removeHandler(records)
    assert logger.level == level  # restored afterwards, for a library user's own nibabel calls
    with quiet_nibabel(), quiet_nibabel():  # nested use restores once, at the outermost exit
        assert logger.level == logging.CRITICAL
    assert logger.level == level
