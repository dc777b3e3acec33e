"""Scipion CTFModel / Acquisition <-> RELION CTF and optics values.

Units are the same on both sides, so the mapping is a renaming: defocus U/V in
Angstrom (underfocus positive), defocus angle in degrees (from the x axis to
the U axis), phase shift in degrees; voltage in kV, Cs in mm, amplitude
contrast as a fraction. Keys of the dicts are the core's field names
(``hetplugin.core.starfile``): ``defocus_u_A``, ``defocus_v_A``,
``defocus_angle_deg``, ``phase_shift_deg``, ``voltage_kV``, ``cs_mm``,
``amplitude_contrast``.
"""
from __future__ import annotations

#: Magnification given to Acquisitions read from STAR files that carry none (Scipion
#: requires one for ``hasAcquisition()``; pixel sizes are kept in the sampling rate).
DEFAULT_MAGNIFICATION = 10000.0

__all__ = ["ctf_to_relion", "relion_to_ctf", "acquisition_to_relion",
           "relion_to_acquisition", "DEFAULT_MAGNIFICATION"]


def ctf_to_relion(ctf_model) -> dict:
    """Scipion ``CTFModel`` -> ``{'defocus_u_A', 'defocus_v_A', 'defocus_angle_deg',
    'phase_shift_deg'}`` (phase shift ``None`` when the model has none), plus
    ``'ctf_max_resolution_A'`` and ``'ctf_figure_of_merit'`` when set."""
    if ctf_model is None:
        raise ValueError("ctf_to_relion: no CTF model")
    u, v, angle = ctf_model.getDefocus()
    if u is None or v is None or angle is None:
        raise ValueError("ctf_to_relion: CTF model without defocus values: %s" % ctf_model)
    out = {"defocus_u_A": float(u), "defocus_v_A": float(v),
           "defocus_angle_deg": float(angle),
           "phase_shift_deg": None}
    phase = ctf_model.getPhaseShift()
    if phase is not None:
        out["phase_shift_deg"] = float(phase)
    if ctf_model.getResolution() is not None:
        out["ctf_max_resolution_A"] = float(ctf_model.getResolution())
    if ctf_model.getFitQuality() is not None:
        out["ctf_figure_of_merit"] = float(ctf_model.getFitQuality())
    return out


def relion_to_ctf(values: dict, ctf_model=None, standardize: bool = True):
    """``{'defocus_u_A', 'defocus_v_A', 'defocus_angle_deg'[, 'phase_shift_deg',
    'ctf_max_resolution_A', 'ctf_figure_of_merit']}`` -> Scipion ``CTFModel``.

    Fills ``ctf_model`` when given (reusing one object in a loop is faster), else
    a new one. With ``standardize`` the model is put in the EMX form Scipion
    expects (U >= V, 0 <= angle < 180, defocus ratio set), as on import.
    """
    if ctf_model is None:
        from pwem.objects import CTFModel
        ctf_model = CTFModel()
    try:
        ctf_model.setDefocusU(float(values["defocus_u_A"]))
        ctf_model.setDefocusV(float(values["defocus_v_A"]))
        ctf_model.setDefocusAngle(float(values["defocus_angle_deg"]))
    except KeyError as e:
        raise ValueError("relion_to_ctf: missing %s" % e) from None
    phase = values.get("phase_shift_deg")
    if phase is not None:
        ctf_model.setPhaseShift(float(phase))
    if values.get("ctf_max_resolution_A") is not None:
        ctf_model.setResolution(float(values["ctf_max_resolution_A"]))
    if values.get("ctf_figure_of_merit") is not None:
        ctf_model.setFitQuality(float(values["ctf_figure_of_merit"]))
    if standardize:
        ctf_model.standardize()
    return ctf_model


def acquisition_to_relion(acquisition) -> dict:
    """Scipion ``Acquisition`` -> ``{'voltage_kV', 'cs_mm', 'amplitude_contrast'}``."""
    if acquisition is None:
        raise ValueError("acquisition_to_relion: no Acquisition")
    values = {"voltage_kV": acquisition.getVoltage(),
              "cs_mm": acquisition.getSphericalAberration(),
              "amplitude_contrast": acquisition.getAmplitudeContrast()}
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError("acquisition_to_relion: the Acquisition has no %s"
                         % ", ".join(missing))
    return {k: float(v) for k, v in values.items()}


def relion_to_acquisition(values: dict, acquisition=None):
    """``{'voltage_kV', 'cs_mm', 'amplitude_contrast'[, 'magnification']}`` ->
    Scipion ``Acquisition`` (filled in place when given)."""
    if acquisition is None:
        from pwem.objects import Acquisition
        acquisition = Acquisition()
    acquisition.setVoltage(float(values["voltage_kV"]))
    acquisition.setSphericalAberration(float(values["cs_mm"]))
    acquisition.setAmplitudeContrast(float(values["amplitude_contrast"]))
    mag = values.get("magnification")
    acquisition.setMagnification(float(mag) if mag else DEFAULT_MAGNIFICATION)
    return acquisition
