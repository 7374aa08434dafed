//! The small value types of `mooncake.engine`: `TransferOpcode` and `TransferNotify`.

use mooncake::OpCode;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

/// Direction of a transfer, as upstream's enum names it (`Read` = 0, `Write` = 1).
#[pyclass(
    module = "mooncake.engine",
    name = "TransferOpcode",
    eq,
    eq_int,
    hash,
    frozen,
    from_py_object
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PyTransferOpcode {
    /// Copy the peer's memory into the local buffer.
    Read = 0,
    /// Copy the local buffer into the peer's memory.
    Write = 1,
}

#[pymethods]
impl PyTransferOpcode {
    /// The member of integer value `value` (0 or 1).
    #[new]
    fn new(value: i64) -> PyResult<Self> {
        match value {
            0 => Ok(PyTransferOpcode::Read),
            1 => Ok(PyTransferOpcode::Write),
            v => Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{v} is not a TransferOpcode value (0 = Read, 1 = Write)"
            ))),
        }
    }

    /// The member's name (`"Read"`, `"Write"`).
    #[getter]
    fn name(&self) -> &'static str {
        match self {
            PyTransferOpcode::Read => "Read",
            PyTransferOpcode::Write => "Write",
        }
    }

    /// The member's integer value.
    #[getter]
    fn value(&self) -> i64 {
        *self as i64
    }
}

impl From<PyTransferOpcode> for OpCode {
    fn from(op: PyTransferOpcode) -> OpCode {
        match op {
            PyTransferOpcode::Read => OpCode::Read,
            PyTransferOpcode::Write => OpCode::Write,
        }
    }
}

/// An `opcode` argument: a `TransferOpcode`, or its integer value (0 or 1).
pub(crate) fn opcode_arg(obj: &Bound<'_, PyAny>) -> PyResult<OpCode> {
    if let Ok(op) = obj.extract::<PyTransferOpcode>() {
        return Ok(op.into());
    }
    match obj.extract::<i64>() {
        Ok(0) if !obj.is_instance_of::<pyo3::types::PyBool>() => Ok(OpCode::Read),
        Ok(1) if !obj.is_instance_of::<pyo3::types::PyBool>() => Ok(OpCode::Write),
        _ => Err(PyTypeError::new_err(
            "opcode must be TransferOpcode.Read or TransferOpcode.Write",
        )),
    }
}

/// A notification sent along with a transfer: who sends it and a message (upstream's
/// `TransferNotify`). This build delivers none: see `TransferEngine.transfer_sync`.
#[pyclass(module = "mooncake.engine", name = "TransferNotify")]
#[derive(Clone, Debug, Default)]
pub(crate) struct PyTransferNotify {
    /// The sender's name.
    #[pyo3(get, set)]
    name: String,
    /// The message.
    #[pyo3(get, set)]
    msg: String,
}

#[pymethods]
impl PyTransferNotify {
    #[new]
    #[pyo3(signature = (name = String::new(), msg = String::new()))]
    fn new(name: String, msg: String) -> Self {
        PyTransferNotify { name, msg }
    }

    fn __repr__(&self) -> String {
        format!("TransferNotify(name={:?}, msg={:?})", self.name, self.msg)
    }
}
