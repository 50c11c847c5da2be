//! DIMSE command sets (PS3.7 E): always Implicit VR Little Endian, group 0000 only.
//! Decoding keeps the raw value of each element; encoding writes the group length first.

use std::collections::BTreeMap;

/// Command Field values (PS3.7 E.1).
pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command element tags (element numbers of group 0000).
pub mod elem {
    pub const AFFECTED_SOP_CLASS_UID: u16 = 0x0002;
    pub const COMMAND_FIELD: u16 = 0x0100;
    pub const MESSAGE_ID: u16 = 0x0110;
    pub const MESSAGE_ID_BEING_RESPONDED_TO: u16 = 0x0120;
    pub const MOVE_DESTINATION: u16 = 0x0600;
    pub const PRIORITY: u16 = 0x0700;
    pub const COMMAND_DATA_SET_TYPE: u16 = 0x0800;
    pub const STATUS: u16 = 0x0900;
    pub const ERROR_COMMENT: u16 = 0x0902;
    pub const AFFECTED_SOP_INSTANCE_UID: u16 = 0x1000;
    pub const NUMBER_OF_REMAINING_SUB_OPERATIONS: u16 = 0x1020;
    pub const NUMBER_OF_COMPLETED_SUB_OPERATIONS: u16 = 0x1021;
    pub const NUMBER_OF_FAILED_SUB_OPERATIONS: u16 = 0x1022;
    pub const NUMBER_OF_WARNING_SUB_OPERATIONS: u16 = 0x1023;
    pub const MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE: u16 = 0x1030;
    pub const MOVE_ORIGINATOR_MESSAGE_ID: u16 = 0x1031;
}

/// (0000,0800) value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;
/// A (0000,0800) value meaning "a data set follows" (any value but 0x0101 does).
pub const DATA_SET_PRESENT: u16 = 0x0000;

/// Largest command set we accept; real ones are a few hundred bytes.
pub const MAX_COMMAND_LENGTH: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("command set is truncated")]
    Truncated,
    #[error("command element (0000,{0:04X}) is missing or malformed")]
    Missing(u16),
    #[error("command set contains a non-command group {0:04X}")]
    WrongGroup(u16),
}

/// A decoded command set: element number -> raw value bytes.
#[derive(Debug, Default, Clone)]
pub struct Command {
    elements: BTreeMap<u16, Vec<u8>>,
}

impl Command {
    pub fn decode(mut bytes: &[u8]) -> Result<Command, CommandError> {
        let mut elements = BTreeMap::new();
        while !bytes.is_empty() {
            if bytes.len() < 8 {
                return Err(CommandError::Truncated);
            }
            let group = u16::from_le_bytes([bytes[0], bytes[1]]);
            let element = u16::from_le_bytes([bytes[2], bytes[3]]);
            let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
            if group != 0x0000 {
                return Err(CommandError::WrongGroup(group));
            }
            let value = bytes.get(8..8 + len).ok_or(CommandError::Truncated)?;
            elements.insert(element, value.to_vec());
            bytes = &bytes[8 + len..];
        }
        Ok(Command { elements })
    }

    pub fn u16(&self, element: u16) -> Result<u16, CommandError> {
        match self.elements.get(&element).map(Vec::as_slice) {
            Some([a, b]) => Ok(u16::from_le_bytes([*a, *b])),
            _ => Err(CommandError::Missing(element)),
        }
    }

    /// A UI/string value with its padding removed.
    pub fn string(&self, element: u16) -> Result<String, CommandError> {
        let raw = self
            .elements
            .get(&element)
            .ok_or(CommandError::Missing(element))?;
        let s = std::str::from_utf8(raw).map_err(|_| CommandError::Missing(element))?;
        Ok(s.trim_end_matches(['\0', ' ']).trim_start().to_string())
    }

    pub fn command_field(&self) -> Result<u16, CommandError> {
        self.u16(elem::COMMAND_FIELD)
    }

    pub fn message_id(&self) -> Result<u16, CommandError> {
        self.u16(elem::MESSAGE_ID)
    }

    pub fn has_data_set(&self) -> bool {
        self.u16(elem::COMMAND_DATA_SET_TYPE)
            .map(|v| v != NO_DATA_SET)
            .unwrap_or(false)
    }
}

/// Builds a command set for sending.
#[derive(Debug, Default)]
pub struct CommandBuilder {
    elements: BTreeMap<u16, Vec<u8>>,
}

impl CommandBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u16(mut self, element: u16, value: u16) -> Self {
        self.elements.insert(element, value.to_le_bytes().to_vec());
        self
    }

    /// A UI value (padded with NUL to even length).
    pub fn uid(mut self, element: u16, value: &str) -> Self {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.elements.insert(element, v);
        self
    }

    /// A text value such as Error Comment (LO, at most 64 characters, space padded).
    pub fn text(mut self, element: u16, value: &str) -> Self {
        let mut v: Vec<u8> = value
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
            .take(64)
            .map(|c| c as u8)
            .collect();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.elements.insert(element, v);
        self
    }

    pub fn encode(self) -> Vec<u8> {
        let body_len: usize = self.elements.values().map(|v| 8 + v.len()).sum();
        let mut out = Vec::with_capacity(12 + body_len);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        for (element, value) in self.elements {
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&element.to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(&value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_round_trips_with_group_length() {
        let bytes = CommandBuilder::new()
            .uid(elem::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.1.1")
            .u16(elem::COMMAND_FIELD, field::C_ECHO_RSP)
            .u16(elem::MESSAGE_ID_BEING_RESPONDED_TO, 7)
            .u16(elem::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .u16(elem::STATUS, 0)
            .encode();
        // Group length counts everything after itself.
        let group_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(group_len, bytes.len() - 12);
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(
            cmd.string(elem::AFFECTED_SOP_CLASS_UID).unwrap(),
            "1.2.840.10008.1.1"
        );
        assert_eq!(cmd.command_field().unwrap(), field::C_ECHO_RSP);
        assert_eq!(cmd.u16(elem::MESSAGE_ID_BEING_RESPONDED_TO).unwrap(), 7);
        assert!(!cmd.has_data_set());
    }

    #[test]
    fn truncated_or_foreign_command_sets_are_rejected() {
        let bytes = CommandBuilder::new().u16(elem::STATUS, 0).encode();
        assert_eq!(
            Command::decode(&bytes[..bytes.len() - 1]).unwrap_err(),
            CommandError::Truncated
        );
        let mut foreign = bytes.clone();
        foreign[0] = 8;
        assert_eq!(
            Command::decode(&foreign).unwrap_err(),
            CommandError::WrongGroup(8)
        );
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(
            cmd.message_id(),
            Err(CommandError::Missing(elem::MESSAGE_ID))
        );
    }

    #[test]
    fn error_comment_is_sanitised_and_capped() {
        let long = "x".repeat(100) + "\\";
        let bytes = CommandBuilder::new()
            .text(elem::ERROR_COMMENT, &long)
            .encode();
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(cmd.string(elem::ERROR_COMMENT).unwrap().len(), 64);
    }
}
