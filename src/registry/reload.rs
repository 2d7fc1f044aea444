//! SIGHUP: the config file is read again and its devices brought in line: added, removed, or
//! replaced when their table changed. A device with a frontend attached that would have to be
//! removed or replaced is left as it is, with a warning (as `device_remove` without force).
//! Devices added at run time are not the file's business. Of the engine's keys, the poll mode
//! and idle spin take effect at once; the others need a restart (logged).

use std::collections::BTreeMap;

use super::{Origin, Registry};
use crate::config::{file_devices, load_file, DeviceConfig};
use crate::engine::Settings;

impl Registry {
    pub fn reload(&self) {
        let Some(path) = self.file.clone() else {
            log::info!("SIGHUP: no config file to read again");
            return;
        };
        let file = match load_file(&path) {
            Ok(f) => f,
            Err(e) => {
                log::error!("SIGHUP: {e}; nothing changed");
                return;
            }
        };
        let wanted: BTreeMap<String, DeviceConfig> = match file_devices(&file) {
            Ok(d) => d.into_iter().map(|d| (d.name.clone(), d)).collect(),
            Err(e) => {
                log::error!("SIGHUP: {}: {e}; nothing changed", path.display());
                return;
            }
        };
        self.reload_engine(&file.engine);
        // (name, connected, the file's table if it came from the file)
        let current: Vec<(String, bool, Option<DeviceConfig>)> = self
            .lock()
            .devices
            .values()
            .map(|e| {
                let from_file = (e.origin == Origin::File).then(|| e.cfg.clone());
                (e.cfg.name.clone(), e.conn.is_some(), from_file)
            })
            .collect();
        for (name, connected, from_file) in &current {
            let Some(old) = from_file else { continue };
            let keep = wanted.get(name).is_some_and(|w| w.table == old.table);
            if keep {
                continue;
            }
            if *connected {
                log::warn!(
                    "SIGHUP: device {name} {} in {} but has a frontend attached; left as it is",
                    if wanted.contains_key(name) {
                        "changed"
                    } else {
                        "is gone"
                    },
                    path.display()
                );
                continue;
            }
            if let Err(e) = self.remove(name, false) {
                log::warn!("SIGHUP: cannot remove device {name}: {e}");
            }
        }
        let present: Vec<String> = self.lock().devices.keys().cloned().collect();
        for (name, cfg) in wanted {
            if present.contains(&name) {
                continue;
            }
            match self.add(cfg, Origin::File) {
                Ok(()) => log::info!("SIGHUP: device {name} added"),
                Err(e) => log::error!("SIGHUP: cannot add device {name}: {e}"),
            }
        }
    }

    fn reload_engine(&self, t: &crate::config::EngineTable) {
        let now = self.settings();
        let mode = match t.poll_mode.as_deref().map(str::parse) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                log::warn!("SIGHUP: {e}; poll mode unchanged");
                now.mode
            }
            None => now.mode,
        };
        let idle_spin = t
            .idle_spin_us
            .map_or(now.idle_spin, std::time::Duration::from_micros);
        let new = Settings { mode, idle_spin };
        if new != now {
            self.set_settings(new);
        }
        let old = self
            .engine
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .clone();
        if t.cpumask != old.cpumask
            || t.rpc_socket != old.rpc_socket
            || t.metrics_addr != old.metrics_addr
            || t.seccomp != old.seccomp
        {
            log::warn!(
                "SIGHUP: cpumask, rpc-socket, metrics-addr and seccomp take effect at the next start"
            );
        }
    }
}
