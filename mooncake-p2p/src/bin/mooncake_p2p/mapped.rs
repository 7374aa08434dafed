//! Files mapped into memory, to register with the transfer engine without copying them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use mooncake_core::memory::ProvidedMemory;

/// A private, copy-on-write mapping of a whole (non-empty) file. Peers read it through the
/// engine; anything written into it (nothing the P2P store does) stays in this process and never
/// reaches the file.
#[derive(Debug)]
pub(crate) struct MappedFile {
    addr: u64,
    len: usize,
}

impl MappedFile {
    /// Maps `path`, which must hold `len > 0` bytes.
    pub(crate) fn open(path: &Path, len: u64) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let on_disk = file.metadata()?.len();
        if on_disk != len || len == 0 {
            return Err(std::io::Error::other(format!(
                "{}: {on_disk} bytes, expected {len} (changed while publishing?)",
                path.display()
            )));
        }
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a new private mapping of `len` bytes of an open file; no existing memory is
        // touched. The mapping outlives `file` (closing the descriptor does not unmap).
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MappedFile {
            addr: raw as u64,
            len,
        })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: mapped in `open` with this address and length; the registry drops this value
        // only once the buffer is unregistered and no region of it is left.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

// SAFETY: `addr` and `len` are fixed at creation and the mapping is not inside the value; `len`
// is non-zero; mmap returns page-aligned addresses (4 KiB pages, `AlignedBuffer::ALIGN`, which
// `AlignedBuffer::from_provided` checks); the mapping is readable and writable by any thread
// until `drop` unmaps it. A file truncated by someone else while mapped makes reads past its end
// fault (SIGBUS), as with any mapped file: do not change published files.
unsafe impl ProvidedMemory for MappedFile {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn len(&self) -> usize {
        self.len
    }
}
