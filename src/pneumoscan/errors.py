"""Every error pneumoscan raises for a person to act on, with the exit code `pneumoscan` gives it.

Each message is one sentence naming the file or setting and the problem, with no patient data;
`cli.main` prints it without a traceback and exits with the class's `exit_code`: 2 for a
mistake in what was asked (`USAGE_ERROR`), 1 for a failure of what was given (`FAILURE`).
`exits_at_once` marks the errors after which the process must end without a normal teardown
(TensorFlow's broken collectives make one spew or hang). The page's twins are in `web/errors.js`
(`ImageError`, `MetadataError`). The modules that raise an error re-export it, so
`from pneumoscan.dicom import DicomError` and the like keep working.

This module imports nothing of pneumoscan: every other module may import it.
"""

from __future__ import annotations

USAGE_ERROR, FAILURE = 2, 1


class PneumoscanError(Exception):
    """An error a person can act on; the message is one sentence."""

    exit_code: int = FAILURE
    exits_at_once: bool = False


class UsageError(PneumoscanError):
    """A mistake in the command line."""

    exit_code = USAGE_ERROR


class DataError(PneumoscanError, ValueError):
    """The data folder cannot be used; the message names the path and the problem."""

    exit_code = USAGE_ERROR


class ImageError(PneumoscanError, ValueError):
    """An input file that cannot be used; the message is one sentence naming the file."""

    exit_code = FAILURE


class DicomError(PneumoscanError, ValueError):
    """A DICOM file that cannot be used: the message is one sentence, without patient data."""

    exit_code = FAILURE


class MetadataError(PneumoscanError, ValueError):
    """metadata.json is missing, unreadable or does not follow the schema."""

    exit_code = FAILURE


class ModelNotFound(PneumoscanError, ValueError):
    """No --model given and no bundled model, or the folder is not a model."""

    exit_code = USAGE_ERROR


class ExportError(PneumoscanError, ValueError):
    """The bundle cannot be written where asked."""

    exit_code = USAGE_ERROR


class ServeError(PneumoscanError, ValueError):
    """The bundle or the TF.js files cannot be served; the message says what to run."""

    exit_code = USAGE_ERROR


class StrategyError(PneumoscanError, ValueError):
    """The strategy cannot run here (no TF_CONFIG, mixed precision without a GPU)."""

    exit_code = USAGE_ERROR


class RunConflict(PneumoscanError, ValueError):
    """The run folder holds a run with another configuration or other data, or the workers of
    a multi-worker run were given different data."""

    exit_code = USAGE_ERROR


class WorkerLost(PneumoscanError, RuntimeError):
    """A worker of a multi-worker run stopped; the others cannot go on."""

    exit_code = FAILURE
    exits_at_once = True


# The packages that only `pip install 'pneumoscan[train]'` installs, by import name, as a person
# knows them (absl and h5py come with TensorFlow and Keras).
TRAINING_PACKAGES = {
    "tensorflow": "TensorFlow",
    "keras": "Keras",
    "absl": "TensorFlow",
    "h5py": "h5py",
    "tensorboard": "TensorBoard",
    "matplotlib": "matplotlib",
}


class MissingExtra(PneumoscanError):
    """A command needs a package of the training extra, and this installation has the light set
    only (`pip install pneumoscan`, `make demo`)."""

    exit_code = FAILURE

    @classmethod
    def of(cls, error: BaseException, command: str) -> MissingExtra | None:
        """The one sentence for `error` when it says a training package is not installed, else None."""
        name = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
        package = TRAINING_PACKAGES.get((name or "").partition(".")[0])
        if package is None:
            return None
        return cls(
            f"pneumoscan {command} needs {package}, which this installation lacks; install the "
            "training dependencies with pip install 'pneumoscan[train]' (or make test in a checkout)."
        )
