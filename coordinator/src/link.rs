//! The coordinator's current RabbitMQ connection, replaced when it is lost.

use std::sync::{Arc, RwLock};

use lapin::Connection;

/// The connection in use now. Readers (health checks) see the new one as soon as the
/// coordinator has reconnected.
pub(crate) struct BrokerLink {
    /// A std RwLock: held only to clone or swap the handle, never across an await.
    connection: RwLock<Arc<Connection>>,
}

impl BrokerLink {
    pub(crate) fn new(connection: Arc<Connection>) -> Self {
        BrokerLink {
            connection: RwLock::new(connection),
        }
    }

    pub(crate) fn replace(&self, connection: Arc<Connection>) {
        *self.connection.write().unwrap_or_else(|p| p.into_inner()) = connection;
    }

    pub(crate) fn connection(&self) -> Arc<Connection> {
        self.connection
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the current connection is up.
    pub(crate) fn connected(&self) -> bool {
        self.connection().status().connected()
    }

    /// Whether the broker blocks the current connection's publishers (a memory or disk
    /// alarm, `connection.blocked`): nothing this coordinator or a worker publishes gets
    /// through until it lifts.
    pub(crate) fn blocked(&self) -> bool {
        self.connection().status().blocked()
    }
}
