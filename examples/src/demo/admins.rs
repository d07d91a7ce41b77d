//! The admin listeners of the demo's sidecars, which `ferryctl explain SERVICE --sidecar ADDR`
//! asks how that sidecar routes a call: written into the env file the demo names at the top of
//! its screen, and listed by the `?` key.
//!
//! A route runs in the sidecars of its service's callers: catalog's route in frontend's
//! sidecars, frontend's in the client sidecar. So the address to ask about catalog is one of
//! frontend's, which is why each service's line says whose routes its sidecars run.

use std::fmt::Write as _;

use super::{CLIENT_SERVICE, SERVICES};

/// One sidecar's admin listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The service it runs for.
    pub service: String,
    /// Its instance's id (`frontend-1`), or `client` for the client sidecar.
    pub id: String,
    pub addr: String,
}

/// The variable of the env file that holds `id`'s admin address: `FERRY_DEMO_FRONTEND_1_ADMIN`.
pub fn env_name(id: &str) -> String {
    let id: String = id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("FERRY_DEMO_{id}_ADMIN")
}

/// The service whose routes the sidecars of `service` run: the one it calls.
fn runs_routes_of(service: &str) -> Option<&'static str> {
    match service {
        "frontend" => Some("catalog"),
        "catalog" => Some("inventory"),
        CLIENT_SERVICE => Some("frontend"),
        _ => None,
    }
}

/// The lines of the env file that export every admin address, after a comment that says what
/// they are for.
pub fn env_lines(admins: &[Admin]) -> String {
    let mut lines = String::from(
        "# The admin listeners of the demo's sidecars, for ferryctl explain SERVICE --sidecar ADDR.\n\
         # A route runs in its callers' sidecars: ask frontend's about catalog, as in\n\
         # ferryctl explain catalog --path /items --sidecar \"$FERRY_DEMO_FRONTEND_1_ADMIN\"\n",
    );
    for admin in admins {
        let _ = writeln!(lines, "export {}={}", env_name(&admin.id), admin.addr);
    }
    lines
}

/// The `?` key's answer: the sidecars' admin addresses, a line per service (frontend first,
/// whose sidecars run catalog's routes), and where the env file has them.
pub fn help(admins: &[Admin]) -> String {
    let mut help = String::from("help: the sidecars' admin addresses, for ferryctl explain SERVICE --sidecar ADDR");
    let services = SERVICES.iter().rev().copied().chain([CLIENT_SERVICE]);
    for service in services {
        let theirs: Vec<String> =
            admins.iter().filter(|a| a.service == service).map(|a| format!("{} {}", a.id, a.addr)).collect();
        if theirs.is_empty() {
            continue;
        }
        let _ = write!(help, "\n  {service}: {}", theirs.join("  "));
        if let Some(callee) = runs_routes_of(service) {
            let _ = write!(help, "  (run {callee}'s routes)");
        }
    }
    help.push_str("\n  (the env file has them as FERRY_DEMO_<INSTANCE>_ADMIN; the keys are listed above)");
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admins() -> Vec<Admin> {
        let admin = |service: &str, id: &str, port: u16| Admin {
            service: service.to_owned(),
            id: id.to_owned(),
            addr: format!("127.0.0.1:{port}"),
        };
        vec![
            admin("inventory", "inventory-1", 40001),
            admin("inventory", "inventory-2", 40002),
            admin("catalog", "catalog-1", 40003),
            admin("catalog", "catalog-2", 40004),
            admin("frontend", "frontend-1", 40005),
            admin("frontend", "frontend-2", 40006),
            admin(CLIENT_SERVICE, "client", 15000),
        ]
    }

    #[test]
    fn the_env_file_exports_every_sidecars_admin_address_under_a_clear_name() {
        let lines = env_lines(&admins());
        assert!(lines.lines().next().is_some_and(|l| l.starts_with("# The admin listeners")), "{lines}");
        assert!(lines.contains("\nexport FERRY_DEMO_FRONTEND_1_ADMIN=127.0.0.1:40005\n"), "{lines}");
        assert!(lines.contains("\nexport FERRY_DEMO_INVENTORY_2_ADMIN=127.0.0.1:40002\n"), "{lines}");
        assert!(lines.ends_with("export FERRY_DEMO_CLIENT_ADMIN=127.0.0.1:15000\n"), "{lines}");
        // Every line is a comment or an export a shell can source.
        assert!(lines.lines().all(|l| l.starts_with("# ") || l.starts_with("export FERRY_DEMO_")), "{lines}");
    }

    #[test]
    fn the_help_key_lists_the_admin_addresses_frontends_first() {
        let help = help(&admins());
        let lines: Vec<&str> = help.lines().collect();
        assert!(lines[0].contains("ferryctl explain SERVICE --sidecar ADDR"), "{help}");
        assert_eq!(lines[1], "  frontend: frontend-1 127.0.0.1:40005  frontend-2 127.0.0.1:40006  (run catalog's routes)");
        assert_eq!(lines[2], "  catalog: catalog-1 127.0.0.1:40003  catalog-2 127.0.0.1:40004  (run inventory's routes)");
        assert_eq!(lines[3], "  inventory: inventory-1 127.0.0.1:40001  inventory-2 127.0.0.1:40002");
        assert_eq!(lines[4], "  demo-client: client 127.0.0.1:15000  (run frontend's routes)");
        assert!(lines[5].contains("FERRY_DEMO_<INSTANCE>_ADMIN"), "{help}");
        // On the live screen, the whole answer shows.
        assert_eq!(crate::demo::screen::answer(&format!("[5s] {help}"), 6).len(), 6, "{help}");
    }
}
