"""The project's own exception family.

Every error a user can cause (a bad path, a file that is not a NIfTI, a 4D image, a weights file that
fails its checksum, no CUDA) is raised as a subclass of :class:`KitssegError`. The CLI turns exactly these
into one red line and the subclass's ``exit_code``; anything else is a bug and is allowed to show a
traceback. Each subclass also inherits the matching built-in exception so library users can catch
``ValueError`` or ``FileNotFoundError`` as they would expect.

Problems that do not stop the work (values that do not look like HU, oblique axes) are warnings of the
:class:`KitssegWarning` family instead; the CLI shows each as one yellow line and goes on. Every message and
exit code is listed in ``docs/errors.md``.
"""

from __future__ import annotations


class KitssegError(Exception):
    """Base class: a problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class KitssegWarning(UserWarning):
    """Base class of the project's warnings: the result is written, but the user should look at the input.

    A subclass of ``UserWarning`` so the usual filters apply (``-W error::UserWarning`` makes them fatal
    in a library user's test suite); the CLI prints each one as a single ``warning:`` line on stderr.
    """


class InvalidOptionError(KitssegError, ValueError):
    """An option value is out of range or inconsistent with the others (bad bounds, unit, job-array part...).

    Every option error goes through this one class, in the library and in each CLI command, so it always
    exits with 2: the code click gives a command line it cannot parse, which is the same kind of mistake.
    """

    exit_code = 2


class InputNotFoundError(KitssegError, FileNotFoundError):
    """A path given by the user does not exist (or a folder holds no NIfTI files)."""

    exit_code = 3


class InvalidImageError(KitssegError, ValueError):
    """A file exists but is not a usable CT or label volume (not NIfTI, truncated, 2D, 4D, NaN...)."""

    exit_code = 4


class GridMismatchError(KitssegError, ValueError):
    """Two volumes that must share a voxel grid (prediction and ground truth) do not."""

    exit_code = 5


class OutputError(KitssegError, OSError):
    """An output cannot be written (not writable, disk full, would overwrite the input)."""

    exit_code = 6


class WeightsError(KitssegError, RuntimeError):
    """Weights are unknown, missing offline, fail their checksum, or cannot be downloaded."""

    exit_code = 7


class ChecksumError(WeightsError):
    """A weights file does not match its registered sha256; it is deleted or refused, never used."""

    exit_code = 8


class DeviceError(KitssegError, RuntimeError):
    """The requested compute device is not available (e.g. ``--device cuda`` without CUDA)."""

    exit_code = 9


class DatasetError(KitssegError, ValueError):
    """A training or statistics dataset folder is missing, empty, or not in a known layout."""

    exit_code = 10


class ResourceError(KitssegError, MemoryError):
    """A volume is too large for the memory available, estimated before any work starts."""

    exit_code = 11


#: Exit code the CLI uses when the user interrupts with Ctrl-C (the shell convention 128 + SIGINT).
EXIT_INTERRUPTED = 130
#: Exit code when the process is asked to stop with SIGTERM (Slurm at a time limit): 128 + SIGTERM.
EXIT_TERMINATED = 143
#: Exit code of a batch in which at least one case failed while the others were written (``segment`` on a
#: folder, ``evaluate``): a code of its own, so a job script can tell "some cases failed" from a usage error
#: (2) or an input error (3-11) that stopped the whole run.
EXIT_BATCH_FAILED = 12
