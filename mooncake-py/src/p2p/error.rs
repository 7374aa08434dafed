//! `mooncake.p2p.P2PError` and the mapping of the P2P store's errors to Python exceptions:
//! misuse (bad arguments or buffers) is a `ValueError`, anything else a `P2PError` whose
//! `kind` says which (`"already_exists"`, `"not_found"`, `"already_pulled"`, `"timeout"`, ...)
//! and whose message gives the reason.

use mooncake_p2p::Error;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

#[allow(missing_docs, unreachable_pub)]
mod exc {
    pyo3::create_exception!(
        mooncake.p2p,
        P2PError,
        pyo3::exceptions::PyRuntimeError,
        "An operation of the P2P store failed; `kind` names why (see mooncake.p2p), `code` is \
         the Mooncake error code for errors of the transfer engine or metadata service, else None."
    );
}
pub(crate) use exc::P2PError;

/// A `P2PError` of `kind` with `message`.
pub(crate) fn p2p_error(py: Python<'_>, kind: &str, code: Option<i32>, message: String) -> PyErr {
    let err = P2PError::new_err(message);
    let value = err.value(py);
    if value.setattr("kind", kind).is_err() || value.setattr("code", code).is_err() {
        return PyRuntimeError::new_err("cannot build a P2PError");
    }
    err
}

/// The error `e` as a Python exception.
pub(crate) fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let kind = match &e {
        Error::InvalidArgument(_) | Error::InvalidBuffers(_) => {
            return PyValueError::new_err(e.to_string())
        }
        Error::AlreadyExists(_) => "already_exists",
        Error::NotFound(_) => "not_found",
        Error::NotRegisteredHere(_) => "not_registered_here",
        Error::AlreadyPulled(_) => "already_pulled",
        Error::NoReplica(_) => "no_replica",
        Error::Timeout { .. } => "timeout",
        Error::Cancelled { .. } => "cancelled",
        Error::BadCatalogEntry { .. } => "bad_catalog_entry",
        Error::Changed(_) => "changed",
        Error::Closed => "closed",
        Error::Core(c) => {
            let kind = match c {
                mooncake::Error::NotSupported(_) => "not_supported",
                mooncake::Error::Metadata(_) => "metadata",
                _ => "engine",
            };
            return p2p_error(py, kind, Some(c.code().code()), e.to_string());
        }
    };
    p2p_error(py, kind, None, e.to_string())
}

/// An error of the binding's runtime (a caught panic, no runtime) as a Python exception.
pub(crate) fn internal(py: Python<'_>, e: mooncake::Error) -> PyErr {
    p2p_error(py, "internal", Some(e.code().code()), e.to_string())
}
