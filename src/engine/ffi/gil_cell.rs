//! A cell for values that only the thread holding the GIL touches.

use std::cell::{Cell, UnsafeCell};

use pyo3::Python;

/// A value used only by the thread holding the GIL (the trace function and the tracer's
/// methods all hold it), with a flag, not atomic, that refuses a nested use as `RefCell` does.
/// A line event costs less than with PyO3's own borrow flag, an atomic read-modify-write.
pub(crate) struct GilRefCell<T> {
    in_use: Cell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reached through `with`, whose callers hold the GIL (the token
// says so), so one thread at a time touches the flag and the value.
unsafe impl<T: Send> Sync for GilRefCell<T> {}

impl<T> GilRefCell<T> {
    pub(crate) fn new(value: T) -> Self {
        GilRefCell {
            in_use: Cell::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` on the value, or returns None when it is in use further up this thread.
    pub(crate) fn with<R>(&self, _py: Python<'_>, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if self.in_use.replace(true) {
            return None;
        }
        /// Clears the flag when `f` returns or unwinds.
        struct Release<'a>(&'a Cell<bool>);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _release = Release(&self.in_use);
        // SAFETY: the GIL is held and the flag was clear, so no other reference is alive.
        Some(f(unsafe { &mut *self.value.get() }))
    }
}
