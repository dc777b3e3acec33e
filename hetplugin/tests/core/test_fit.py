"""Rotational map fitting: the turn is found, and the pose convention that goes with it holds."""
import numpy as np
import torch

from hetplugin.core.fit import fit_rotation, rotate_volume
from hetplugin.core.masks import spherical_mask
from hetplugin.core.poses import rotvec_to_matrix
from hetplugin.core.projection import project_images
from hetplugin.core.rotations import angular_distance_deg
from hetplugin.core.simulate import make_class_volumes


def test_a_turned_map_is_fitted_back_and_its_poses_follow():
    vol = make_class_volumes(48, 1, seed=3)[0]
    turn = rotvec_to_matrix(np.array([[0.12, -0.22, 0.15]]))[0]                 # 17.4 degrees
    turned = rotate_volume(torch.as_tensor(vol), torch.as_tensor(turn[None]))[0].numpy()
    found, score = fit_rotation(turned, vol, 2.0, 6.0, mask=spherical_mask(48, 20, 3))
    # turned(x) = vol(turn^T x): rotate_volume(turned, G) = vol when G = turn^T
    assert angular_distance_deg(found[None], turn.T[None])[0] < 1.0
    assert score > 0.97
    # the image of vol at pose R is the image of the turned map at pose R @ turn^T
    pose = rotvec_to_matrix(np.array([[0.3, 1.0, -0.4]]))
    a = project_images(torch.as_tensor(vol, dtype=torch.float64), torch.as_tensor(pose)).numpy()
    b = project_images(torch.as_tensor(turned, dtype=torch.float64), torch.as_tensor(pose @ turn.T)).numpy()
    c = project_images(torch.as_tensor(turned, dtype=torch.float64), torch.as_tensor(pose @ turn)).numpy()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert np.corrcoef(a.ravel(), c.ravel())[0, 1] < 0.95


def test_no_turn_for_a_map_in_the_frame_already():
    vol = make_class_volumes(32, 1, seed=5)[0]
    found, _ = fit_rotation(vol, vol, 3.0, 9.0)
    assert angular_distance_deg(found[None], np.eye(3)[None])[0] < 0.5
