//! VOI windowing (PS3.3 C.11.2.1.2): the LINEAR, LINEAR_EXACT and SIGMOID functions that map a
//! modality value to a display value between `y_min` and `y_max`.
//!
//! dicom-pixeldata implements LINEAR only; the three are written here from the standard's formulas.

/// The VOI LUT Function (0028,1056).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Linear,
    LinearExact,
    Sigmoid,
}

impl Function {
    /// Parses a VOI LUT Function value (case-insensitive, as PS3.18's `window` parameter allows).
    pub fn parse(s: &str) -> Option<Function> {
        match s.trim().to_ascii_uppercase().as_str() {
            "LINEAR" => Some(Function::Linear),
            "LINEAR_EXACT" => Some(Function::LinearExact),
            "SIGMOID" => Some(Function::Sigmoid),
            _ => None,
        }
    }
}

/// A window: Window Center (0028,1050), Window Width (0028,1051) and the function applying them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
    pub function: Function,
}

impl Window {
    /// A window, or None when its width is not allowed for its function (LINEAR needs a width of
    /// at least 1, the others a positive one).
    pub fn new(center: f64, width: f64, function: Function) -> Option<Window> {
        let valid = match function {
            Function::Linear => width >= 1.0,
            Function::LinearExact | Function::Sigmoid => width > 0.0,
        };
        (valid && center.is_finite() && width.is_finite()).then_some(Window {
            center,
            width,
            function,
        })
    }

    /// The display value of `x` between `y_min` and `y_max` (PS3.3 C.11.2.1.2.1 and .2).
    pub fn apply(&self, x: f64, y_min: f64, y_max: f64) -> f64 {
        let (c, w) = (self.center, self.width);
        let range = y_max - y_min;
        match self.function {
            Function::Linear => {
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    y_min
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    y_max
                } else if w == 1.0 {
                    // The formula divides by w - 1; a width of 1 is a threshold at c - 0.5.
                    y_max
                } else {
                    ((x - (c - 0.5)) / (w - 1.0) + 0.5) * range + y_min
                }
            }
            Function::LinearExact => {
                if x <= c - w / 2.0 {
                    y_min
                } else if x > c + w / 2.0 {
                    y_max
                } else {
                    ((x - c) / w + 0.5) * range + y_min
                }
            }
            Function::Sigmoid => range / (1.0 + (-4.0 * (x - c) / w).exp()) + y_min,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(c: f64, w: f64, f: Function) -> Window {
        Window::new(c, w, f).unwrap()
    }

    #[test]
    fn linear_follows_the_standard_formula() {
        // c = 40, w = 400 (a CT soft-tissue window), output 0..255.
        let w = win(40.0, 400.0, Function::Linear);
        // Below c - 0.5 - (w-1)/2 = -160: y_min; above c - 0.5 + (w-1)/2 = 239: y_max.
        assert_eq!(w.apply(-160.0, 0.0, 255.0), 0.0);
        assert_eq!(w.apply(-1000.0, 0.0, 255.0), 0.0);
        assert_eq!(w.apply(239.5, 0.0, 255.0), 255.0);
        // x = 40: ((40 - 39.5) / 399 + 0.5) * 255 = 127.8195...
        assert!((w.apply(40.0, 0.0, 255.0) - 127.819_548_872).abs() < 1e-6);
        // x = 0: ((0 - 39.5) / 399 + 0.5) * 255 = 102.255639...
        assert!((w.apply(0.0, 0.0, 255.0) - 102.255_639_098).abs() < 1e-6);
        // A 12-bit output range: x = 239: ((239 - 39.5)/399 + 0.5) * 4095 = 4095.
        assert!((w.apply(239.0, 0.0, 4095.0) - 4095.0).abs() < 1e-9);
    }

    #[test]
    fn linear_with_width_one_is_a_threshold() {
        let w = win(100.0, 1.0, Function::Linear);
        assert_eq!(w.apply(99.5, 0.0, 255.0), 0.0);
        assert_eq!(w.apply(99.6, 0.0, 255.0), 255.0);
        assert!(Window::new(100.0, 0.5, Function::Linear).is_none());
        assert!(Window::new(100.0, 0.5, Function::LinearExact).is_some());
        assert!(Window::new(100.0, 0.0, Function::Sigmoid).is_none());
    }

    #[test]
    fn linear_exact_follows_the_standard_formula() {
        let w = win(40.0, 400.0, Function::LinearExact);
        assert_eq!(w.apply(-160.0, 0.0, 255.0), 0.0);
        assert_eq!(w.apply(240.5, 0.0, 255.0), 255.0);
        // x = 240 is the upper edge, still inside: ((240-40)/400 + 0.5) * 255 = 255.
        assert_eq!(w.apply(240.0, 0.0, 255.0), 255.0);
        // x = 40: exactly the middle.
        assert_eq!(w.apply(40.0, 0.0, 255.0), 127.5);
        // x = 0: ((0-40)/400 + 0.5) * 255 = 0.4 * 255 = 102.
        assert!((w.apply(0.0, 0.0, 255.0) - 102.0).abs() < 1e-9);
    }

    #[test]
    fn sigmoid_follows_the_standard_formula() {
        let w = win(40.0, 400.0, Function::Sigmoid);
        // At the center: half the range.
        assert!((w.apply(40.0, 0.0, 255.0) - 127.5).abs() < 1e-9);
        // x = 140: 255 / (1 + e^(-4*100/400)) = 255 / (1 + e^-1) = 186.4198...
        assert!((w.apply(140.0, 0.0, 255.0) - 186.419_8).abs() < 1e-3);
        // x = -60: 255 / (1 + e) = 68.5802...
        assert!((w.apply(-60.0, 0.0, 255.0) - 68.580_2).abs() < 1e-3);
        // An offset output range.
        assert!((w.apply(40.0, 10.0, 20.0) - 15.0).abs() < 1e-9);
    }

    #[test]
    fn functions_parse_case_insensitively() {
        assert_eq!(Function::parse("linear"), Some(Function::Linear));
        assert_eq!(Function::parse("LINEAR_EXACT"), Some(Function::LinearExact));
        assert_eq!(Function::parse(" Sigmoid "), Some(Function::Sigmoid));
        assert_eq!(Function::parse("cubic"), None);
    }
}
