//! The hook through which a backend shrinks its world before it reads
//! anything a guest controls.

use crate::Result;

/// Confines the process after setup and before serving.
///
/// [`crate::daemon::serve`] calls [`Sandbox::enter`] once: after the image or
/// tap fd is open, the vhost-user socket is connected and the device's setup
/// hook has run, and before the first vhost-user message is read. That is the
/// order DESIGN.md ("Sandboxing") asks for: the parent opens what the child
/// needs, then the child drops what it no longer needs (namespaces,
/// pivot_root, capabilities, no_new_privs, seccomp) before touching untrusted
/// input. Worker threads started later inherit the confinement.
pub trait Sandbox {
    /// Enters the sandbox; an error aborts the program before it serves.
    fn enter(&self) -> Result<()>;
}

/// The sandbox used until the jail lands: does nothing.
///
/// It exists so that every backend already calls the hook at the right point;
/// the jail issue replaces it with a real policy per device.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSandbox;

impl Sandbox for NoSandbox {
    fn enter(&self) -> Result<()> {
        log::debug!("sandbox: none configured");
        Ok(())
    }
}
