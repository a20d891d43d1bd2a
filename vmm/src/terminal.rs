//! Raw mode for an interactive `-serial stdio`: the guest, not our terminal, interprets
//! keystrokes (line editing, Ctrl-C). Restored on exit.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal.
pub fn set_raw() {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return;
    }
    // SAFETY: termios is plain data; zeroed is a valid value to be overwritten by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a termios owned by this frame.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
        return;
    }
    let saved = t;
    // SAFETY: cfmakeraw only modifies the struct it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // Keep output post-processing so our own log lines still start at column 0.
    t.c_oflag |= libc::OPOST;
    // SAFETY: valid fd and pointer.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) } == 0 {
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(saved);
    }
}

/// Restores the terminal state saved by [`set_raw`].
pub fn restore() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // SAFETY: valid fd and pointer to the saved termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}
