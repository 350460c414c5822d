//! Service-manager notifications (systemd `Type=notify`): readiness once a
//! relay's listeners are bound or a daemon first reached its relay, a
//! status line as the state changes, reloading on SIGHUP, stopping on
//! SIGTERM. Without `$NOTIFY_SOCKET` (not under systemd) these do nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("cannot notify the service manager: {e}");
    }
}

/// Startup is finished; `status` says what the service does now.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A status line for `systemctl status`.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// A reload (SIGHUP) begins; follow with [`ready`].
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown begins.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}
