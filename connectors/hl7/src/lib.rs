//! HL7 v2 over MLLP.
//!
//! - [`MllpSourceConnector`]: a listener that turns each HL7 message into a record and answers
//!   `AA` only once Kafka acknowledged it (`AE`/`AR` otherwise; invalid messages go to the
//!   dead-letter topic);
//! - [`MllpSinkConnector`]: sends each record's value to a downstream MLLP receiver and moves
//!   on only when the receiver answered `AA`.

pub mod ack;
pub mod batch;
pub mod config;
pub mod limits;
pub mod message;
pub mod mllp;
mod sink;
mod source;
mod structure;

pub use sink::{MllpSinkConnector, MllpSinkTask};
pub use source::{MllpSourceConnector, MllpSourceTask};

/// Messages shared by the unit tests.
#[cfg(test)]
pub(crate) mod samples {
    pub const ADT_A01: &str = "MSH|^~\\&|EPIC|HOSP|MEDCONNECT|DC|20240101120000||ADT^A01^ADT_A01|MSG00001|P|2.5.1\rEVN|A01|20240101120000\rPID|1||PAT123^^^HOSP^MR||DOE^JOHN\rPV1|1|I\r";
    pub const ORU_R01: &str = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20240101120000||ORU^R01|LAB0001|P|2.3\rPID|1||77^^^LAB||ROE^JANE\rOBR|1||ORD1|CBC\rOBX|1|NM|WBC||7.5|10*9/L|||||F\r";

    /// An ADT^A01 with its own control id and patient id.
    pub fn adt(control_id: &str, patient: &str) -> String {
        ADT_A01
            .replace("MSG00001", control_id)
            .replace("PAT123", patient)
    }
}
