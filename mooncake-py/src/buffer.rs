//! Bytes across the boundary: [`ByteView`] borrows the memory of any contiguous bytes-like
//! argument (bytes, bytearray, memoryview, numpy arrays) without copying, and [`BufferHandle`]
//! hands a value back to Python through the buffer protocol.

use std::ffi::{c_char, c_int, c_void};

use pyo3::exceptions::{PyBufferError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;

/// A held buffer export of a Python object (`PyBUF_SIMPLE`: C-contiguous bytes), released on drop.
pub(crate) struct ByteView {
    view: Box<ffi::Py_buffer>,
}

impl ByteView {
    /// Borrows the bytes of `obj`; a `TypeError` names what was expected when `obj` has none.
    pub(crate) fn new(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<ByteView> {
        // SAFETY: Py_buffer is plain C data; all-zero is the state PyObject_GetBuffer expects.
        let mut view: Box<ffi::Py_buffer> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: `obj` is a live object (we hold the GIL); `view` is a valid, writable Py_buffer.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), &mut *view, ffi::PyBUF_SIMPLE) };
        if rc != 0 {
            let cause = PyErr::take(obj.py());
            let type_name = obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "?".into());
            return Err(match cause {
                Some(e) if e.is_instance_of::<PyBufferError>(obj.py()) => PyBufferError::new_err(
                    format!("{what}: {type_name} is not a contiguous buffer ({e})"),
                ),
                _ => PyTypeError::new_err(format!(
                    "{what} must be a bytes-like object (bytes, bytearray, memoryview, numpy array), not {type_name}"
                )),
            });
        }
        Ok(ByteView { view })
    }

    /// The borrowed bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        if self.view.buf.is_null() || self.view.len <= 0 {
            return &[];
        }
        // SAFETY: the export is held until drop, so `buf` points at `len` readable bytes.
        unsafe { std::slice::from_raw_parts(self.view.buf as *const u8, self.view.len as usize) }
    }
}

impl Drop for ByteView {
    fn drop(&mut self) {
        // SAFETY: the view was filled by a successful PyObject_GetBuffer; ByteView is !Send, so
        // it is dropped on the thread that holds the GIL, where it was made.
        unsafe { ffi::PyBuffer_Release(&mut *self.view) }
    }
}

/// Borrows each object of `objs` as bytes.
pub(crate) fn views(objs: &[Bound<'_, PyAny>], what: &str) -> PyResult<Vec<ByteView>> {
    objs.iter().map(|o| ByteView::new(o, what)).collect()
}

/// An object's value in memory owned by the handle, exposed through the buffer protocol
/// (one-dimensional, unsigned bytes, writable), with `ptr()`, `size()` and `len()`.
#[pyclass(module = "mooncake.store", frozen)]
pub(crate) struct BufferHandle {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the handle owns its allocation and never creates Rust references to it; Python code may
// read or write it through exported views, which is the buffer protocol's contract.
unsafe impl Send for BufferHandle {}
// SAFETY: as above.
unsafe impl Sync for BufferHandle {}

impl BufferHandle {
    /// Takes ownership of `bytes`.
    pub(crate) fn new(bytes: Vec<u8>) -> BufferHandle {
        let boxed = bytes.into_boxed_slice();
        let len = boxed.len();
        let ptr = Box::into_raw(boxed) as *mut u8;
        BufferHandle { ptr, len }
    }
}

impl Drop for BufferHandle {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` came from Box::into_raw of a boxed slice of exactly `len` bytes.
        // Python keeps this object alive while any export of it exists (view.obj holds a
        // reference), so no view outlives the memory.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

static FORMAT_B: &[u8; 2] = b"B\0";

#[pymethods]
impl BufferHandle {
    /// Address of the first byte.
    fn ptr(&self) -> usize {
        self.ptr as usize
    }

    /// Size in bytes.
    fn size(&self) -> usize {
        self.len
    }

    fn __len__(&self) -> usize {
        self.len
    }

    fn __repr__(&self) -> String {
        format!(
            "<BufferHandle size={} ptr={:#x}>",
            self.len, self.ptr as usize
        )
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("view is null"));
        }
        let (ptr, len) = {
            let me = slf.get();
            (me.ptr, me.len)
        };
        // SAFETY: `view` is a valid Py_buffer supplied by the interpreter; the fields we point at
        // (`len`, `itemsize`) live inside it, and `obj` keeps this handle, hence `ptr`, alive.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len as isize;
            (*view).readonly = 0;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                FORMAT_B.as_ptr() as *mut c_char
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                &mut (*view).len
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                &mut (*view).itemsize
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
