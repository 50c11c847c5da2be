//! C-ECHO SCP (PS3.4 A): Verification always succeeds once the association is up.

use super::command::{elem, field, Command, CommandBuilder, NO_DATA_SET};

/// The Verification SOP class.
pub const VERIFICATION: &str = "1.2.840.10008.1.1";

pub fn response(cmd: &Command) -> Vec<u8> {
    CommandBuilder::new()
        .uid(elem::AFFECTED_SOP_CLASS_UID, VERIFICATION)
        .u16(elem::COMMAND_FIELD, field::C_ECHO_RSP)
        .u16(
            elem::MESSAGE_ID_BEING_RESPONDED_TO,
            cmd.message_id().unwrap_or(0),
        )
        .u16(elem::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .u16(elem::STATUS, 0x0000)
        .encode()
}
