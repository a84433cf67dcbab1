"""Stand-in TPU slices and GPU boxes: the meshes and data layouts real topologies get.

CPU fake devices come in process order; these tests build the mesh with `partitioning.make_mesh`
(`jax.make_mesh`'s torus-aware order, the code `specialize train` runs) over stand-in devices with
real-slice coordinates and hosts, and check the layout every host then feeds.
"""
import itertools

import numpy as np
import pytest

from specialize_jax.training import input_pipeline
from specialize_jax.training import partitioning
from specialize_jax.planning import topologies
from tests.support import demo_data

# (topology, chip grid, chips per host); v4/v5p names count TensorCores, v5e/v6e chips.
SLICES = [('v4-8', (2, 2, 1), 4), ('v4-16', (2, 2, 2), 4), ('v4-32', (2, 2, 4), 4),
          ('v4-128', (4, 4, 4), 4), ('v5e-8', (2, 4, 1), 8), ('v5e-16', (4, 4, 1), 4),
          ('v5e-256', (16, 16, 1), 4), ('v5p-64', (2, 4, 4), 4), ('v6e-8', (2, 4, 1), 8),
          ('v6e-16', (4, 4, 1), 4), ('v6e-64', (8, 8, 1), 4), ('8xH100', None, 8),
          ('16xH100', None, 8)]


@pytest.mark.parametrize('name,grid,per_host', SLICES)
def test_stand_in_devices_are_laid_out_as_the_real_slice(name, grid, per_host):
  topo = topologies.topology(name)
  devices = topologies.stand_in_devices(topo)
  assert len(devices) == topo.num_devices and topo.chip_grid == grid
  hosts = {}
  for device in devices:
    hosts.setdefault(device.process_index, []).append(device)
  assert sorted(hosts) == list(range(topo.num_hosts))
  assert {len(h) for h in hosts.values()} == {per_host}
  assert [d.id for d in devices] == list(range(len(devices)))
  if grid is None:
    return
  assert sorted(d.coords for d in devices) == sorted(
      (x, y, z) for x, y, z in itertools.product(*map(range, grid)))
  for held in hosts.values():  # A host owns a block of the torus: 2x2 chips, or the whole tray.
    spans = [max(d.coords[a] for d in held) - min(d.coords[a] for d in held) + 1 for a in range(3)]
    assert int(np.prod(spans)) == per_host


# (topology, model axis): every shipped experiment's header and the generations' layouts.
MESHES = [('v4-8', 1), ('v4-16', 1), ('v4-16', 2), ('v4-32', 1), ('v4-32', 2), ('v5e-16', 1),
          ('v5e-16', 2), ('v5p-64', 4), ('v5p-64', 1), ('v6e-16', 1), ('v6e-64', 4),
          ('8xH100', 1), ('16xH100', 2), ('16xH100', 16)]


def _layouts(name, num_partitions, batch_size):
  topo = topologies.topology(name)
  mesh = partitioning.make_mesh(partitioning.PartitioningConfig(num_partitions=num_partitions),
                                topologies.stand_in_devices(topo))
  grid = np.asarray(mesh.devices)
  return grid, {p: partitioning.data_layout(mesh, batch_size, p) for p in range(topo.num_hosts)}


@pytest.mark.parametrize('name,num_partitions', MESHES)
def test_every_host_feeds_exactly_the_rows_of_the_coordinates_its_chips_hold(name,
                                                                            num_partitions):
  data = topologies.topology(name).num_devices // num_partitions
  batch_size = 2 * data
  grid, layouts = _layouts(name, num_partitions, batch_size)
  assert grid.shape == (data, num_partitions)
  for host, layout in layouts.items():
    held = sorted({i for (i, _), d in np.ndenumerate(grid) if d.process_index == host})
    assert list(layout.coordinates) == held
    # Its local batch: each coordinate's 2 rows, in global order (what
    # `jax.make_array_from_process_local_data` takes).
    np.testing.assert_array_equal(layout.row_indices,
                                  [r for c in held for r in (2 * c, 2 * c + 1)])
    # Its shards (what the input pipeline reads) are aligned blocks covering exactly those rows.
    rows = [r for index, count in layout.shards
            for r in range(index * batch_size // count, (index + 1) * batch_size // count)]
    np.testing.assert_array_equal(rows, layout.row_indices)
  # Every coordinate is fed; hosts holding one coordinate hold the same ones (replicas).
  assert set().union(*(l.coordinates for l in layouts.values())) == set(range(data))
  for a, b in itertools.combinations(layouts.values(), 2):
    assert set(a.coordinates) == set(b.coordinates) or not set(a.coordinates) & set(b.coordinates)


def test_a_tpu_host_holds_interleaved_data_coordinates():
  """What broke every multi-host slice: `jax.make_mesh` orders chips by torus position."""
  _, layouts = _layouts('v4-32', 1, 32)
  assert layouts[0].coordinates == (0, 4, 8, 12)
  assert layouts[0].describe() == ('rows 0-1, 8-9, 16-17, 24-25 of 32 '
                                   '(data coordinates [0, 4, 8, 12] of 16)')
  _, layouts = _layouts('v5p-64', 4, 16)  # The XXL setting: hosts 0 and 1 are replicas.
  assert layouts[0].coordinates == layouts[1].coordinates == (0, 4)
  _, layouts = _layouts('8xH100', 1, 16)  # GPUs: one host, in order.
  assert layouts[0].shards == ((0, 1),)


def test_the_torus_order_is_never_a_longer_ring_than_host_by_host():
  for name, num_partitions in MESHES:
    topo = topologies.topology(name)
    grid, _ = _layouts(name, num_partitions, 1024)
    by_host = np.asarray(topologies.host_contiguous(list(grid.flat)), dtype=object)
    assert (topologies.ring_hops(grid, topo) <=
            topologies.ring_hops(by_host.reshape(grid.shape), topo)), name


def test_gpu_plans_allow_what_jax_preallocates(monkeypatch):
  h100, v4 = topologies.topology('8xH100'), topologies.topology('v4-8')
  monkeypatch.delenv(topologies.GPU_MEM_FRACTION_ENV, raising=False)
  assert topologies.usable_fraction(h100, 0.9) == 0.75
  assert topologies.usable_fraction(v4, 0.9) == 0.9
  monkeypatch.setenv(topologies.GPU_MEM_FRACTION_ENV, '.95')
  assert topologies.usable_fraction(h100, 0.9) == 0.9
  monkeypatch.setenv(topologies.GPU_MEM_FRACTION_ENV, '0.5')
  assert topologies.usable_fraction(h100, 0.9) == 0.5
  monkeypatch.setenv(topologies.GPU_MEM_FRACTION_ENV, 'most')
  with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION='most' is not a number"):
    topologies.usable_fraction(h100, 0.9)


@pytest.mark.slow
def test_each_v4_32_host_reads_its_rows_of_the_global_batches(tmp_path_factory):
  """The input pipeline over the demo's prepared set, fed as the four hosts of a v4-32 feed it
  (four interleaved blocks each), equals the global batches' rows, also resumed at batch 3."""
  _, layouts = _layouts('v4-32', 1, 32)
  config = input_pipeline.DatasetConfig('demo_train_cot', {'inputs': 128, 'targets': 64},
                                        batch_size=32, seed=3)
  with demo_data.tiny_demo_data(tmp_path_factory, num_train=256, num_eval=8):
    whole = input_pipeline.TrainIterator(config, shards=[(0, 1)])
    batches = [next(whole) for _ in range(4)]
    for position in (None, {'batches_consumed': 3, 'seed': 3}):
      for layout in layouts.values():
        assert len(layout.shards) == 4
        host = input_pipeline.TrainIterator(config, position, shards=layout.shards)
        for expected in batches[3 if position else 0:]:
          got = next(host)
          for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value[layout.row_indices], err_msg=name)
