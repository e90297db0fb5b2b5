"""The Zarr store of the sink cube: one writer (the driver), one group per probe, 1 step per chunk.

One group opens as an ``xarray.Dataset`` (the names, dtypes and fill values are spelled in pipeline/store/schema.py):

* data variables ``(step, ...)``: NaN until the step is written;
* ``step``: index coordinate, sorted;
* ``tokens_seen`` ``(step)`` float64 coordinate, NaN where the checkpoint does not say;
* ``loss`` ``(step)`` float64 coordinate: the training loss logged at the step, NaN where the checkpoint does not
  say (groups written before it existed gain it on their next write);
* ``status`` ``(step)`` string coordinate, ``pending`` | ``done`` | ``failed``;
* ``error`` ``(step)`` string coordinate: why a step failed, ``""`` otherwise;
* ``weights_digest`` ``(step)`` string coordinate: the digest of the step's weights (``checkpoints.digest``), ``""``
  until the step is done;
* ``replay_route``, ``replay_device``, ``replay_dtype`` ``(step)`` string coordinates: how the step was replayed
  (``whole`` or ``layered``, e.g. ``cuda:0``, ``bfloat16``), ``""`` until the step is done (groups written before
  they existed gain them, empty, on their next write).

``status``, ``error``, ``weights_digest`` and ``tokens_seen`` are coordinates rather than data variables so that they
follow every DataArray taken from the cube and stay out of whole-Dataset arithmetic:
``ds.where(ds.status == "done")`` works, which it does not for a string data variable.

Nothing stored may be lost when the writer is killed at any moment, and a rerun must finish the
job. Four rules make it so:

* A step's data goes in before its status says ``done``: a kill leaves the step not done, and the
  rerun computes it again.
* Creating the group and inserting a step between stored ones (a rewrite of everything) write the
  whole new group under a staging name, mark the staging group complete, and only then overwrite
  the real group from it. While a complete staging group exists it is the truth: the next writer
  finishes the copy, readers read it.
* Appends (new steps after all stored ones, the live-training case) resize the arrays in place under
  a journal attribute; an interrupted append is rolled back, since its new steps held no data yet.
* The data variables are created by the first write, which is when their dims are known, as
  metadata only and under a marker attribute; a half-made set is deleted by the repair.

The repair runs when a writer first touches the store. Consolidated metadata is dropped before
any metadata change and written again by :meth:`SinkStore.finalize`, so it can be missing but
never stale.

A writer reads each metadata file (``zarr.json``) of its store at most once in its life: it holds the
store open and keeps what it read or wrote of the metadata (``store/metadata.py``). xarray and zarr
open the group afresh for each region write; on object storage every one of those reads would be a
round trip. Only one process writes a store at a time, so what the writer holds cannot go stale.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
import zarr
from zarr.errors import ZarrUserWarning

from .metadata import HeldMetadata, open_store
from .schema import (
    DONE,
    FAILED,
    NUMERIC_STEP_COORDS,
    PENDING,
    PROBE_DIMS,
    PROBE_TOKENS,
    REPLAY_COORDS,
    STEP_ATTRS,
    STEP_COORDS,
    STRING,
)

_STAGING_SUFFIX = ".staging"
_COMPLETE = "sinktrace_staging_complete"
_RESIZE_FROM = "sinktrace_resize_from"
_ADDING = "sinktrace_adding_variables"


class StoreMismatchError(ValueError):
    """A step's statistics do not fit the cube already stored (another model or probe)."""


@dataclass
class _Layout:
    """What the group holds, read once per writer and after each change of layout."""

    steps: np.ndarray
    index: dict[int, int]
    data_vars: dict[str, dict[str, int]]  # name -> {dim: size}, step excluded
    coords: dict[str, np.ndarray]  # coordinates without a step dim
    attrs: dict


class SinkStore:
    """The writer of one probe group. Only one process may write a store at a time."""

    def __init__(self, path: str | os.PathLike, group: str):
        if not group or "/" in group or group.startswith("__") or group.endswith(_STAGING_SUFFIX):
            raise ValueError(f"invalid probe group name {group!r}")
        self.path = os.fspath(path)
        self.group = group
        self._staging = group + _STAGING_SUFFIX
        self._store = HeldMetadata(open_store(self.path))
        self._layout: _Layout | None = None
        self._repaired = False

    # ---------------------------------------------------------------- public API

    def prepare(
        self,
        steps: Sequence[int],
        *,
        tokens_seen: Mapping[int, int | None] = {},
        loss: Mapping[int, float | None] = {},
        attrs: Mapping = {},
        probe_tokens: np.ndarray | None = None,
    ) -> None:
        """Allocate every step in ``steps`` (status pending) and merge ``attrs`` into the group's.

        Args:
            steps: training steps; those already stored keep their data and status.
            tokens_seen: step -> tokens seen, where the checkpoint says; None leaves it unknown.
            loss: step -> training loss, where the checkpoint says; None leaves it unknown.
            attrs: run attributes (JSON types), merged into the group's attributes.
            probe_tokens: the probe's token ids [rows, T], recorded as the coordinate ``probe_tokens`` when the
                group does not hold it yet (the caller checks that a group it reuses holds the same probe).
        """
        layout = self._ready()
        wanted = sorted({int(s) for s in steps})
        known = {
            name: {int(s): float(v) for s, v in given.items() if v is not None}
            for name, given in (("tokens_seen", tokens_seen), ("loss", loss))
        }
        if layout is not None:
            self._add_step_coords()
        if layout is None:
            self._rebuild(self._allocated(None, wanted, known))
        else:
            new = [s for s in wanted if s not in layout.index]
            if new and layout.steps.size and new[0] < layout.steps[-1]:
                self._rebuild(self._allocated(self._load(self.group), new, known))
            elif new:
                self._append(layout, new, known)
        if probe_tokens is not None and PROBE_TOKENS not in _listed_coordinates(self._zgroup()):
            self._add_probe_tokens(np.asarray(probe_tokens, dtype=np.int64))
        self._layout = self._load_layout()
        self._update_known(known)
        if attrs:
            self._drop_consolidated()
            self._zgroup().update_attributes(_jsonable(dict(attrs)))
            self._layout.attrs.update(_jsonable(dict(attrs)))

    def attrs(self) -> dict:
        """The group's attributes ({} before the group exists)."""
        layout = self._ready()
        return dict(layout.attrs) if layout is not None else {}

    def status(self) -> dict[int, str]:
        """step -> "pending" | "done" | "failed", for every allocated step."""
        layout = self._ready()
        if layout is None:
            return {}
        group = self._zgroup()
        values = group["status"][:]
        lost = _lost(values, group["sink_mass"][:] if "sink_mass" in group else None)
        return {int(s): PENDING if gone else str(v) for s, v, gone in zip(layout.steps, values, lost, strict=True)}

    def write_step(self, step: int, ds: xr.Dataset) -> None:
        """Store one step's statistics, then mark the step done. Writing it again is harmless.

        Args:
            step: an allocated training step.
            ds: that step's statistics, without a step dim, with its weights' digest and how it was replayed as
                scalar coordinates (``schema.REPLAY_COORDS``) where known. Its variables, dims, coordinates,
                architecture and config fingerprint must match what the group already holds,
                else StoreMismatchError is raised and nothing is written.
        """
        layout = self._ready()
        i = self._position(step)
        replayed = {name: str(ds[name].values) if name in ds.coords else "" for name in REPLAY_COORDS}
        ds = self._conform(int(step), ds.drop_vars(list(REPLAY_COORDS), errors="ignore"), layout)
        new = [k for k in ds.data_vars if k not in layout.data_vars]
        if new:  # the first write, or statistics this group did not hold yet (NaN at the steps before)
            self._add_variables(ds[new])
            self._layout = layout = self._load_layout()
        # statistics the group holds but this step did not measure (replay.measure): NaN, not a stale value
        for k in layout.data_vars:
            if k not in ds.data_vars:
                ds[k] = xr.DataArray(
                    np.full(list(layout.data_vars[k].values()), np.nan), dims=list(layout.data_vars[k])
                )
        region = {"step": slice(i, i + 1)}
        if self._zgroup()["status"][i] != PENDING:
            # an overwrite: while the data changes, the step must not claim to be done
            self._write_strings(i, status=PENDING)
        ds.drop_vars(list(ds.coords)).drop_attrs().expand_dims("step").to_zarr(
            self._store, group=self.group, mode="r+", region=region, consolidated=False
        )
        self._write_strings(i, error="", **replayed)
        self._write_strings(i, status=DONE)

    def mark_failed(self, step: int, error: str) -> None:
        """Record that ``step`` failed and why; its data, if any, stays as it was."""
        self._ready()
        i = self._position(step)
        self._write_strings(i, error=str(error))
        self._write_strings(i, status=FAILED)

    def finalize(self) -> None:
        """Consolidate the store's metadata (once, at the end of a run)."""
        self._ready()
        if self._root() is None:
            return
        with warnings.catch_warnings():
            # the inline v3 form is outside the spec and may go (zarr-specs #371, zarr-python
            # #3709); it is only a read speed-up, and readers cope without it
            warnings.filterwarnings("ignore", "Consolidated metadata", ZarrUserWarning)
            zarr.consolidate_metadata(self._store)

    # ---------------------------------------------------------------- layout

    def _ready(self) -> _Layout | None:
        if not self._repaired:
            self._repair()
            self._repaired = True
            self._layout = self._load_layout()
        return self._layout

    def _position(self, step: int) -> int:
        layout = self._layout
        if layout is None or int(step) not in layout.index:
            raise KeyError(
                f"step {int(step)} is not allocated in {self.path} group {self.group!r}; call prepare() with it first"
            )
        return layout.index[int(step)]

    def _load_layout(self) -> _Layout | None:
        root = self._root()
        if root is None or self.group not in root:
            return None
        with xr.open_dataset(self._store, group=self.group, engine="zarr", consolidated=False, chunks=None) as ds:
            steps = ds["step"].values.astype(np.int64)
            return _Layout(
                steps=steps,
                index={int(s): i for i, s in enumerate(steps)},
                data_vars={
                    k: {d: n for d, n in v.sizes.items() if d != "step"}
                    for k, v in ds.data_vars.items()
                    if k not in STEP_COORDS and k != PROBE_TOKENS
                },
                coords={k: c.values for k, c in ds.coords.items() if "step" not in c.dims},
                attrs=dict(ds.attrs),
            )

    def _load(self, name: str) -> xr.Dataset:
        with xr.open_dataset(self._store, group=name, engine="zarr", consolidated=False, chunks=None) as ds:
            ds = ds.load()
        ds.attrs.pop(_COMPLETE, None)
        return ds.drop_encoding()

    def _allocated(
        self, cur: xr.Dataset | None, new: list[int], known: Mapping[str, Mapping[int, float]]
    ) -> xr.Dataset:
        """``cur`` (or an empty group) with the steps ``new`` added, pending, in sorted order."""
        if cur is None:
            n = len(new)
            ds = xr.Dataset(
                coords={
                    "step": ("step", np.asarray(new, dtype=np.int64)),
                    **{name: ("step", np.full(n, fill, dtype=dtype)) for name, (dtype, fill) in STEP_COORDS.items()},
                }
            )
        else:
            fills = {k: np.nan for k in cur.data_vars} | {name: fill for name, (_, fill) in STEP_COORDS.items()}
            ds = cur.reindex(step=np.union1d(cur["step"].values, new), fill_value=fills)
        fresh = set(new)
        for name in NUMERIC_STEP_COORDS:
            values = ds[name].values.copy() if name in ds.variables else np.full(ds.sizes["step"], np.nan)
            for i, s in enumerate(ds["step"].values.tolist()):
                if s in fresh and s in known.get(name, {}):
                    values[i] = known[name][s]
            ds = ds.assign_coords({name: ("step", values)})
        return ds

    def _add_variables(self, ds: xr.Dataset) -> None:
        """Create every data variable of one step's ``ds`` for all allocated steps, NaN filled.

        Only metadata is written (NaN is the fill value), so this costs the same for 10 steps as
        for 10^4, unlike a rebuild. xarray's ``mode="a"`` replaces the group attributes before it
        creates the arrays: the attributes written carry the current ones plus a marker naming the
        new variables, and until the marker is gone a repair deletes them (they hold no data yet).
        The same path adds statistics a group did not hold yet to a group already written.
        """
        import dask.array  # here, not at the top: only a new group or new statistics need it

        n = self._layout.steps.size
        group = self._zgroup()
        adding = sorted(k for k in ds.variables if k not in group)
        attrs = dict(group.attrs) | _jsonable(dict(ds.attrs)) | {_ADDING: adding}
        template = xr.Dataset(
            {
                k: xr.Variable(
                    ("step", *v.dims),
                    dask.array.full(
                        (n, *v.shape),
                        np.nan,
                        chunks=(1, *v.shape),
                        dtype=np.result_type(v.dtype, np.float32),
                    ),
                    # name the step coordinates too, or they read back as data variables
                    attrs=v.attrs
                    | {
                        "coordinates": " ".join(
                            sorted(
                                [
                                    *STEP_COORDS,
                                    *(c for c in ds.coords if c not in ds.dims and set(ds[c].dims) <= set(v.dims)),
                                ]
                            )
                        )
                    },
                )
                for k, v in ds.data_vars.items()
            },
            coords={k: c.variable for k, c in ds.coords.items()},
            attrs=attrs,
        )
        self._drop_consolidated()
        template.to_zarr(
            self._store,
            group=self.group,
            mode="a",
            compute=False,
            consolidated=False,
            encoding={k: {"chunks": (1, *v.shape)} for k, v in ds.data_vars.items()},
        )
        del self._zgroup().attrs[_ADDING]  # a fresh handle: xarray rewrote the attributes

    def _rebuild(self, new: xr.Dataset) -> None:
        self._drop_consolidated()
        self._delete_staging()
        self._write_group(new, self._staging)
        self._zgroup(self._staging).update_attributes({_COMPLETE: True})
        self._promote_staging(new)

    def _promote_staging(self, ds: xr.Dataset) -> None:
        self._write_group(ds, self.group)
        self._delete_staging()

    def _write_group(self, ds: xr.Dataset, name: str) -> None:
        # one step per chunk: region writes into chunks shared by several steps lose data
        # silently (xarray #8371, zarr-python #3682)
        encoding = {k: {"chunks": (1, *v.shape[1:])} for k, v in ds.variables.items() if "step" in v.dims}
        # unwritten chunks read as these, so pending steps and empty errors cost no files
        for coord, (dtype, fill) in STEP_COORDS.items():
            if dtype == STRING:
                encoding[coord]["fill_value"] = fill
        ds.transpose("step", ...).to_zarr(
            self._store, group=name, mode="w", consolidated=False, zarr_format=3, encoding=encoding
        )

    def _delete_staging(self) -> None:
        root = self._root()
        if root is None:
            return
        if self._staging in root:
            # unmark before deleting: a half-deleted staging group must never pass for complete
            staging = root[self._staging]
            if _COMPLETE in staging.attrs:
                del staging.attrs[_COMPLETE]
        del root[self._staging]

    def _append(self, layout: _Layout, new: list[int], known: Mapping[str, Mapping[int, float]]) -> None:
        n, k = layout.steps.size, len(new)
        self._drop_consolidated()
        group = self._zgroup()
        group.update_attributes({_RESIZE_FROM: n})
        for array in _step_arrays(group):
            array.resize((n + k, *array.shape[1:]))
        # region writes drop index coordinates ("can't modify indexes with region writes" in
        # xarray/backends/zarr.py), so the step values go in through zarr
        group["step"][n:] = np.asarray(new, dtype=np.int64)
        xr.Dataset(
            {
                **{name: ("step", np.array([known[name].get(s, np.nan) for s in new])) for name in NUMERIC_STEP_COORDS},
                **{
                    name: ("step", np.full(k, fill, dtype=dtype))
                    for name, (dtype, fill) in STEP_COORDS.items()
                    if dtype == STRING
                },
            }
        ).to_zarr(
            self._store,
            group=self.group,
            mode="r+",
            region={"step": slice(n, n + k)},
            consolidated=False,
        )
        del group.attrs[_RESIZE_FROM]

    def _update_known(self, known: Mapping[str, Mapping[int, float]]) -> None:
        """Record token counts and losses learnt for steps already stored (never erase a known one)."""
        layout = self._layout
        for name, values in known.items():
            current = self._zgroup()[name][:]
            updated = current.copy()
            for s, v in values.items():
                updated[layout.index[s]] = v
            if not np.array_equal(updated, current, equal_nan=True):
                xr.Dataset({name: ("step", updated)}).to_zarr(
                    self._store,
                    group=self.group,
                    mode="r+",
                    region={"step": slice(0, updated.size)},
                    consolidated=False,
                )

    def _add_probe_tokens(self, tokens: np.ndarray) -> None:
        """Record the probe's ids as a coordinate of the group (dims PROBE_DIMS, no step): named in the group's
        ``coordinates`` attribute, the way xarray records a coordinate that no data variable shares dims with. The
        name goes in after the data, so an array a killed writer left unnamed is written again."""
        self._drop_consolidated()
        group = self._zgroup()
        if PROBE_TOKENS in group:
            del group[PROBE_TOKENS]
        array = group.create_array(
            PROBE_TOKENS, shape=tokens.shape, chunks=tokens.shape, dtype=np.int64, dimension_names=list(PROBE_DIMS)
        )
        array[...] = tokens
        group.update_attributes({"coordinates": " ".join(sorted({*_listed_coordinates(group), PROBE_TOKENS}))})

    def _add_step_coords(self) -> None:
        """Give a group written before a numeric step coordinate existed (``loss``) that coordinate, NaN filled:
        metadata only, and named in each data variable's ``coordinates`` so it reads back as a coordinate."""
        group = self._zgroup()
        missing = [name for name in NUMERIC_STEP_COORDS if name not in group]
        if not missing:
            return
        self._drop_consolidated()
        n = group["step"].shape[0]
        for name in missing:
            dtype, fill = STEP_COORDS[name]
            group.create_array(name, shape=(n,), chunks=(1,), dtype=dtype, fill_value=fill, dimension_names=["step"])
        _name_coordinates(group, missing)

    def _repair(self) -> None:
        """Finish or undo whatever a killed writer left half done."""
        root = self._root()
        if root is None:
            return
        if self._staging in root and root[self._staging].attrs.get(_COMPLETE):
            self._drop_consolidated()
            self._promote_staging(self._load(self._staging))
        else:
            self._delete_staging()  # also the remains of a half-deleted one, without zarr.json
        if self.group in root:
            group = self._zgroup()
            n = group.attrs.get(_RESIZE_FROM)
            if n is not None:
                self._drop_consolidated()
                for array in _step_arrays(group):
                    if array.shape[0] != n:
                        array.resize((n, *array.shape[1:]))
                del group.attrs[_RESIZE_FROM]
            adding = group.attrs.get(_ADDING)
            if adding:
                self._drop_consolidated()
                for name in list(group.array_keys()):
                    # True: a store written when variables were only ever created all at once, by the first write
                    if name not in ("step", *STEP_COORDS) and (adding is True or name in adding):
                        del group[name]
                del group.attrs[_ADDING]
            if missing := [name for name in REPLAY_COORDS if name not in group.array_keys()]:
                self._add_replay_coordinates(group, missing)
        self._remove_orphans()

    def _add_replay_coordinates(self, group: zarr.Group, names: list[str]) -> None:
        """A store written before steps carried a weights digest, or how they were replayed, gets the (empty)
        coordinates."""
        self._drop_consolidated()
        n = group["step"].shape[0]
        xr.Dataset({name: ("step", np.full(n, STEP_COORDS[name][1], dtype=STRING)) for name in names}).to_zarr(
            self._store,
            group=self.group,
            mode="a",
            consolidated=False,
            encoding={name: {"chunks": (1,), "fill_value": STEP_COORDS[name][1]} for name in names},
        )
        _name_coordinates(group, names)

    def _remove_orphans(self) -> None:
        # zarr's LocalStore writes each key to "<key>.<uuid>.partial" and renames it; a SIGKILL in
        # between leaves the partial file, and in a group folder zarr then warns on every listing
        if "://" in self.path:
            return
        for folder in (self.path, os.path.join(self.path, self.group)):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.endswith(".partial"):
                        os.unlink(os.path.join(folder, name))

    # ---------------------------------------------------------------- checks and small writes

    def _conform(self, step: int, ds: xr.Dataset, layout: _Layout) -> xr.Dataset:
        """``ds`` checked against the stored cube, with its variables in the stored dim order."""
        where = f"step {step} for {self.path} group {self.group!r}"
        if "step" in ds.dims:
            raise StoreMismatchError(f"{where}: the Dataset must hold one step, without a step dim")
        if "step" in ds.coords:
            if int(ds["step"]) != step:
                raise StoreMismatchError(f"{where}: the Dataset says step {int(ds['step'])}")
            ds = ds.drop_vars("step")
        if clash := [k for k in STEP_COORDS if k in ds.variables]:
            raise StoreMismatchError(f"{where}: {clash} are reserved names")
        if not ds.data_vars:
            raise StoreMismatchError(f"{where}: no data variables")
        problems = [
            f"{key} {ds.attrs[key]!r}, stored {layout.attrs[key]!r}"
            for key in STEP_ATTRS
            if key in ds.attrs and key in layout.attrs and ds.attrs[key] != layout.attrs[key]
        ]
        if layout.data_vars:
            for k, v in ds.data_vars.items():
                stored = layout.data_vars.get(k)
                if stored is not None and dict(v.sizes) != stored:
                    problems.append(f"{k} {_dims(v.sizes)}, stored {_dims(stored)}")
            for k, c in ds.coords.items():
                stored = layout.coords.get(k)
                if stored is not None and not np.array_equal(c.values, stored):
                    problems.append(f"coordinate {k} {c.values.tolist()}, stored {stored.tolist()}")
        if problems:
            problems = "; ".join(problems)
            raise StoreMismatchError(f"{where} does not match the stored cube: {problems}")
        if layout.data_vars:
            ds = xr.Dataset(
                {k: v.transpose(*layout.data_vars[k]) if k in layout.data_vars else v for k, v in ds.data_vars.items()},
                coords=ds.coords,
                attrs=ds.attrs,
            )
        return ds

    def _write_strings(self, i: int, **values: str) -> None:
        xr.Dataset({k: ("step", np.array([v], dtype=STRING)) for k, v in values.items()}).to_zarr(
            self._store,
            group=self.group,
            mode="r+",
            region={"step": slice(i, i + 1)},
            consolidated=False,
        )

    # ---------------------------------------------------------------- zarr handles

    def _root(self) -> zarr.Group | None:
        try:
            return zarr.open_group(self._store, mode="r+", use_consolidated=False)
        except FileNotFoundError:
            return None

    def _zgroup(self, name: str | None = None) -> zarr.Group:
        return zarr.open_group(self._store, mode="r+", path=name or self.group, use_consolidated=False)

    def _drop_consolidated(self) -> None:
        """Remove the consolidated metadata before the metadata it copies changes."""
        try:
            root = zarr.open_group(self._store, mode="r")
        except FileNotFoundError:
            return
        if root.metadata.consolidated_metadata is not None:
            # opened without it, the root's metadata is saved back without it
            zarr.open_group(self._store, mode="r+", use_consolidated=False).update_attributes({})


def open_sinks(path: str | os.PathLike, group: str | None = None) -> xr.Dataset | xr.DataTree:
    """Open a sink store: one probe's Dataset, or all of them.

    ``group`` given: that probe's Dataset. ``None``: a DataTree with one node per probe, however
    many there are. Works with or without consolidated metadata.
    """
    path = os.fspath(path)
    root = zarr.open_group(path, mode="r")
    consolidated = root.metadata.consolidated_metadata is not None
    nodes = _probe_nodes(root)
    if group is not None:
        if group not in nodes:
            raise KeyError(f"{path} has no probe group {group!r}; it has {sorted(nodes)}")
        return _open_node(path, nodes[group], consolidated)
    if not nodes:
        raise KeyError(f"{path} holds no probe groups")
    datasets = {name: _open_node(path, node, consolidated) for name, node in nodes.items()}
    return xr.DataTree.from_dict({f"/{name}": ds for name, ds in sorted(datasets.items())})


def _probe_nodes(root: zarr.Group) -> dict[str, str]:
    """probe name -> the group to read it from."""
    groups = dict(root.groups())
    nodes = {name: name for name in groups if not name.endswith(_STAGING_SUFFIX)}
    for name, g in groups.items():
        if name.endswith(_STAGING_SUFFIX) and g.attrs.get(_COMPLETE):
            # a writer died while copying this complete group over the real one
            nodes[name.removesuffix(_STAGING_SUFFIX)] = name
    return nodes


def _lost(status, sink_mass) -> np.ndarray:
    """Which steps say done but hold no data (a lost write): the next run replays them, and no reader trusts
    them."""
    done = np.array([str(v) == DONE for v in status], dtype=bool)
    if sink_mass is None or not done.any():
        return np.zeros(len(done), dtype=bool)
    return done & np.isnan(sink_mass.reshape(sink_mass.shape[0], -1)).all(axis=1)


def _open_node(path: str, node: str, consolidated: bool) -> xr.Dataset:
    ds = xr.open_dataset(path, group=node, engine="zarr", consolidated=consolidated, chunks=None)
    ds = ds.set_coords([k for k in STEP_COORDS if k in ds.data_vars])
    ds.attrs.pop(_COMPLETE, None)
    lost = _lost(ds["status"].values, ds["sink_mass"].values if "sink_mass" in ds else None)
    if lost.any():
        status, error = ds["status"].values.astype(object), ds["error"].values.astype(object)
        status[lost] = PENDING
        error[lost] = "marked done, but its data is missing: the next run replays it"
        ds = ds.assign_coords(status=("step", status.astype(STRING)), error=("step", error.astype(STRING)))
    if not ds.indexes["step"].is_monotonic_increasing:
        ds = ds.sortby("step")
    return ds


def _name_coordinates(group: zarr.Group, names) -> None:
    """Add step coordinates given to an older group to each data variable's ``coordinates`` attribute, so that
    xarray reads them back as coordinates, not data variables."""
    for _, array in group.arrays():
        listed = array.attrs.get("coordinates")
        if listed and not set(names) <= set(listed.split()):
            array.update_attributes({"coordinates": " ".join(sorted({*listed.split(), *names}))})


def _listed_coordinates(group: zarr.Group) -> set[str]:
    """The coordinates a group's ``coordinates`` attribute names (those that share no dims with a variable)."""
    return set(str(group.attrs.get("coordinates", "")).split())


def _step_arrays(group: zarr.Group) -> list[zarr.Array]:
    return [a for _, a in group.arrays() if (a.metadata.dimension_names or (None,))[0] == "step"]


def _dims(sizes: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{d}: {n}" for d, n in sizes.items()) + ")"


def _jsonable(value):
    """Attributes as plain JSON types (zarr stores attributes as JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
