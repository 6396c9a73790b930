//! What every test-only connector has in common, so a test spells out only the behaviour it
//! is about (its task).

/// Implements `Connector` for a test connector: its class name, kind (`Source` or `Sink`) and
/// settings (none unless given), and as task configs `tasks.max` copies of its config.
#[macro_export]
macro_rules! test_connector {
    ($connector:ty, $class:literal, $kind:ident) => {
        $crate::test_connector!($connector, $class, $kind, medconnect_api::ConfigDef::new());
    };
    ($connector:ty, $class:literal, $kind:ident, $config_def:expr) => {
        #[$crate::async_trait]
        impl medconnect_api::Connector for $connector {
            fn class(&self) -> &'static str {
                $class
            }
            fn version(&self) -> &'static str {
                "0"
            }
            fn kind(&self) -> medconnect_api::ConnectorKind {
                medconnect_api::ConnectorKind::$kind
            }
            fn config_def(&self) -> medconnect_api::ConfigDef {
                $config_def
            }
            async fn task_configs(
                &self,
                context: &medconnect_api::ConnectorContext,
                max_tasks: usize,
            ) -> medconnect_api::ConnectResult<Vec<medconnect_api::TaskConfig>> {
                Ok(vec![context.config.clone(); max_tasks])
            }
        }
    };
}
