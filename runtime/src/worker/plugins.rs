//! The connector plugins a worker knows, looked up by class or alias. The embedder registers
//! them (the `medconnect` package registers the built-in connectors).

use std::sync::Arc;

use medconnect_api::{Connector, ConnectorKind, SinkConnector, SourceConnector};

#[derive(Clone)]
pub enum ConnectorPlugin {
    Source(Arc<dyn SourceConnector>),
    Sink(Arc<dyn SinkConnector>),
}

impl ConnectorPlugin {
    pub fn connector(&self) -> &dyn Connector {
        match self {
            Self::Source(c) => c.as_ref(),
            Self::Sink(c) => c.as_ref(),
        }
    }

    pub fn kind(&self) -> ConnectorKind {
        match self {
            Self::Source(_) => ConnectorKind::Source,
            Self::Sink(_) => ConnectorKind::Sink,
        }
    }

    /// The simple name Connect shows (`FileSourceConnector`).
    pub fn simple_name(&self) -> &'static str {
        let class = self.connector().class();
        class.rsplit('.').next().unwrap_or(class)
    }

    fn matches(&self, name: &str) -> bool {
        let connector = self.connector();
        connector.class() == name
            || self.simple_name() == name
            || connector.aliases().contains(&name)
    }
}

#[derive(Clone, Default)]
pub struct Plugins {
    connectors: Vec<ConnectorPlugin>,
}

impl Plugins {
    pub fn with_source(mut self, connector: Arc<dyn SourceConnector>) -> Self {
        self.connectors.push(ConnectorPlugin::Source(connector));
        self
    }

    pub fn with_sink(mut self, connector: Arc<dyn SinkConnector>) -> Self {
        self.connectors.push(ConnectorPlugin::Sink(connector));
        self
    }

    pub fn find(&self, name: &str) -> Option<ConnectorPlugin> {
        self.connectors.iter().find(|p| p.matches(name)).cloned()
    }

    pub fn all(&self) -> &[ConnectorPlugin] {
        &self.connectors
    }
}
