"""Medical volumes: MedSAM preprocessing, windowing, propagation through a generated volume, geometry kept."""
import sys

import numpy as np
import pytest

from anyseg import load_model
from anyseg.beyond import MissingExtra
from anyseg.beyond.demo import volume_phantom
from anyseg.beyond.medical import (MedSamPredictor, dice, make_medical_predictor, read_volume, segment_volume,
                                   window)

SHAPE = (64, 56, 14)


@pytest.fixture(scope="module")
def model():
    return load_model("nano")


def _box(truth, z):
    xs, ys = np.nonzero(truth[:, :, z])
    return [xs.min() - 2, ys.min() - 2, xs.max() + 2, ys.max() + 2]


def test_window():
    data = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    np.testing.assert_array_equal(window(data, "soft-tissue"), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(window(data, (0, 100)), [0, 0, 102, 255, 255])
    with pytest.raises(ValueError, match="HI > LO"):
        window(data, (5, 5))
    with pytest.raises(ValueError, match="unknown window"):
        window(data, "heart")


def test_medsam_preprocessing_squashes_and_scales(model):
    p = make_medical_predictor(model, "medsam")
    assert isinstance(p, MedSamPredictor)
    image = np.zeros((40, 100, 3), np.uint8)
    image[10:30, 60:90] = 200  # a bright rectangle on a wide image
    p.set_image(image)
    assert p.input_size == (model.img_size, model.img_size) and p.original_size == (40, 100)
    # Min-max scaling: the same image at another intensity range encodes the same.
    first = p.get_image_embedding().clone()
    p.set_image(image.astype(np.float32) * 7 - 300)
    np.testing.assert_allclose(p.get_image_embedding().numpy(), first.numpy(), atol=1e-4)
    d = p.decode(box=np.array([58, 8, 92, 32.0]), multimask_output=False)
    mask = d.masks[0]
    # The box reaches the model scaled per axis (S / W, S / H): the square frame, no aspect kept.
    import torch

    s = model.img_size
    scaled = torch.tensor([[58 * s / 100, 8 * s / 40, 92 * s / 100, 32 * s / 40]], dtype=torch.float32)
    masks, _, _ = p.predict_torch(None, None, scaled, None, False)
    np.testing.assert_array_equal(masks[0, 0].numpy(), mask)
    batch = p.decode_batch(boxes=np.array([[58, 8, 92, 32.0]]), multimask_output=False)
    np.testing.assert_array_equal(batch.masks[0, 0], mask)


@pytest.mark.parametrize("preprocess", ["medsam", "sam"])
def test_propagation_through_a_volume(model, preprocess):
    """Dice of the whole 3-D mask against the ellipsoid above 0.85 (measured about 0.95) from one box on the
    middle slice; propagation stops where the object ends."""
    vol, truth, _ = volume_phantom(SHAPE, seed=0)
    z = SHAPE[2] // 2
    result = segment_volume(make_medical_predictor(model, preprocess), vol, z, _box(truth, z), window_bounds="soft-tissue")
    assert dice(result.mask, truth) > 0.85
    present = np.nonzero(truth.any(axis=(0, 1)))[0]
    assert abs(result.slices[0] - present[0]) <= 1 and abs(result.slices[-1] - present[-1]) <= 1
    with pytest.raises(ValueError, match="outside the volume"):
        segment_volume(make_medical_predictor(model, preprocess), vol, 99, _box(truth, z))


def test_segment_volume_cli_keeps_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    from anyseg.cli import main

    vol, truth, affine = volume_phantom(SHAPE, seed=1)
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "scan.nii.gz"))
    z = SHAPE[2] // 2
    x0, y0, x1, y1 = _box(truth, z)
    out = tmp_path / "mask.nii.gz"
    assert main(["segment-volume", str(tmp_path / "scan.nii.gz"), "--box", f"{z},{x0},{y0},{x1},{y1}",
                 "--window", "soft-tissue", "-o", str(out)]) == 0
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.8, 2.5))
    assert dice(np.asarray(img.dataobj) > 0, truth) > 0.85
    assert main(["segment-volume", str(tmp_path / "scan.nii.gz"), "--box", f"{z},{x0},{y0},{x1},{y1}",
                 "-o", str(tmp_path / "mask.png")]) == 2


def test_dicom_series_geometry(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    data = np.arange(4 * 5 * 3, dtype=np.int16).reshape(3, 4, 5)  # z, rows (Y), columns (X)
    series = generate_uid()
    for k in (2, 0, 1):  # written out of order: sorted by position
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(str(tmp_path / f"s{k}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SeriesInstanceUID, ds.SOPClassUID = series, meta.MediaStorageSOPClassUID
        ds.Rows, ds.Columns = 4, 5
        ds.PixelSpacing, ds.ImageOrientationPatient = [0.5, 0.7], [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [10, 20, 30 + 2.0 * k]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = data[k].tobytes()
        ds.save_as(str(tmp_path / f"s{k}.dcm"), enforce_file_format=True)
    volume = read_volume(tmp_path)
    assert volume.data.shape == (5, 4, 3)
    np.testing.assert_array_equal(volume.data[:, :, 1], data[1].T.astype(np.float32) - 1024)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.5, 2.0))
    np.testing.assert_allclose(volume.affine[:3, 3], (-10, -20, 30))  # LPS -> RAS


def test_missing_nibabel_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nibabel", None)
    (tmp_path / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(MissingExtra, match=r"anyseg\[medical\]"):
        read_volume(tmp_path / "scan.nii.gz")
