//! Little-endian f32 bytes: the byte order of every tensor in the bundle, of the cache's
//! embedding blobs and of the bytes the provenance's embedding hash covers.

/// The f32 values of little-endian bytes (a trailing partial value is ignored).
pub fn f32s_from_le(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Little-endian bytes of f32 values.
pub fn f32s_to_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bit_for_bit() {
        let v = [0.0f32, -0.0, 1.5, f32::MIN_POSITIVE, -3.25e7, f32::NAN];
        let back: Vec<f32> = f32s_from_le(&f32s_to_le(&v)).collect();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(f32s_to_le(&[1.0]), 1.0f32.to_le_bytes());
    }
}
