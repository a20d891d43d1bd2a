//! Events raised inside the VM (e.g. BALLOON_CHANGED, raised by a guest's config write on a
//! vCPU thread) on their way to the gateway. Devices are built before the control channel
//! exists, so they get a relay that is connected to it afterwards; until then (or without a
//! gateway) events are only logged.

use std::sync::{Arc, Mutex, OnceLock};

use serde_json::Value;

use crate::control::ControlSender;

type Recorder = Arc<Mutex<Vec<(String, Value)>>>;

/// Where device events go.
#[derive(Clone, Default)]
pub struct EventRelay {
    sender: Arc<OnceLock<ControlSender>>,
    recorder: Arc<OnceLock<Recorder>>,
}

impl EventRelay {
    /// Sends events to the gateway from now on.
    pub fn connect(&self, sender: ControlSender) {
        if self.sender.set(sender).is_err() {
            log::warn!("events: the control channel was connected twice");
        }
    }

    /// Emits event `name` with `data`.
    pub fn emit(&self, name: &str, data: Value) {
        if let Some(recorder) = self.recorder.get() {
            recorder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((name.to_string(), data.clone()));
        }
        match self.sender.get() {
            Some(sender) => sender.event(name, data),
            None => log::info!("event {name} {data} (no control channel)"),
        }
    }

    /// Keeps a copy of every event emitted from now on (tests).
    pub fn record(&self) -> Recorder {
        self.recorder.get_or_init(Recorder::default).clone()
    }
}
