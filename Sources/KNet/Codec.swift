import CKNet

/// Byte order of an integer in a stream.
public enum Endianness: Sendable, Hashable {
    /// Most significant byte first (network byte order).
    case big
    /// Least significant byte first.
    case little
}

/// Frames messages on a connection: `read` decodes one message from the buffered input,
/// `write` frames one outgoing message. `read` runs on the connection's loop thread;
/// `write` runs on the thread that called `send` and must not call into knet at all, not
/// even `send` on another connection: off the loop it runs under the connection's lock,
/// and two such writes sending on each other's connection would wait on each other for
/// ever. Keep it short.
///
/// `read` is written as if reading a blocking stream: when it asks the `ByteReader` for
/// more bytes than are buffered, the reader throws, and knet calls `read` again from the
/// start of the frame once more bytes arrived (so do not catch the reader's errors). A
/// `read` must consume at least one byte per message. Any other error thrown closes only
/// that connection, with `KNetError.codec`.
public protocol Codec: Sendable {
    /// Decodes one message from the connection's buffered input (runs on its loop thread).
    func read(from reader: inout ByteReader) throws -> [UInt8]
    /// Frames one message into `writer` (runs on the sending thread).
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws
    /// The largest frame, and the most input knet buffers for one partial frame: a frame
    /// that consumes more, or a partial frame that outgrows it, closes the connection with
    /// `KNetError.codec`; 0 (the default) means 16 MiB.
    var maxFrameSize: Int { get }
}

extension Codec {
    /// By default knet buffers up to 16 MiB of one partial frame.
    public var maxFrameSize: Int { 0 }
}

/// Thrown by `ByteReader` when a codec asks for more bytes than are buffered; knet then
/// waits for more input and calls the codec again.
@usableFromInline
struct NeedMoreBytes: Error {
    @usableFromInline init() {}
}

/// Reads from a connection's buffered input inside `Codec.read(from:)`. It is valid only
/// during that call. Asking for more than `readableBytes` makes knet wait for more input.
public struct ByteReader {
    @usableFromInline let buffer: UnsafeRawBufferPointer
    @usableFromInline var readerIndex: Int

    @usableFromInline
    init(_ buffer: UnsafeRawBufferPointer) {
        self.buffer = buffer
        self.readerIndex = 0
    }

    /// The number of buffered bytes not read yet.
    @inlinable
    public var readableBytes: Int { buffer.count - readerIndex }

    /// The number of bytes read so far in this call (what knet consumes for the message).
    @inlinable
    public var consumedBytes: Int { readerIndex }

    /// Reads an integer (big-endian by default); waits for more input when too few bytes are buffered.
    @inlinable
    public mutating func readInteger<T: FixedWidthInteger>(as type: T.Type = T.self,
                                                          endianness: Endianness = .big) throws -> T {
        let value: T = try peekInteger(as: type, endianness: endianness)
        readerIndex += MemoryLayout<T>.size
        return value
    }

    /// Reads an integer without consuming it; waits for more input when too few bytes are buffered.
    @inlinable
    public func peekInteger<T: FixedWidthInteger>(as type: T.Type = T.self,
                                                 endianness: Endianness = .big) throws -> T {
        let size = MemoryLayout<T>.size
        guard readableBytes >= size else { throw NeedMoreBytes() }
        let raw = buffer.loadUnaligned(fromByteOffset: readerIndex, as: T.self)
        return endianness == .big ? T(bigEndian: raw) : T(littleEndian: raw)
    }

    /// Reads exactly `count` bytes; waits for more input when too few are buffered.
    /// A negative count throws `KNetError.codec`.
    @inlinable
    public mutating func readBytes(_ count: Int) throws -> [UInt8] {
        guard count >= 0 else { throw KNetError.codec }
        guard readableBytes >= count else { throw NeedMoreBytes() }
        let start = readerIndex
        readerIndex += count
        return [UInt8](UnsafeRawBufferPointer(rebasing: buffer[start..<start + count]))
    }

    /// Skips exactly `count` bytes; waits for more input when too few are buffered.
    @inlinable
    public mutating func skipBytes(_ count: Int) throws {
        guard count >= 0 else { throw KNetError.codec }
        guard readableBytes >= count else { throw NeedMoreBytes() }
        readerIndex += count
    }

    /// Reads every buffered byte (possibly none).
    @inlinable
    public mutating func readAll() -> [UInt8] {
        let start = readerIndex
        readerIndex = buffer.count
        return [UInt8](UnsafeRawBufferPointer(rebasing: buffer[start...]))
    }

    /// The buffered bytes not read yet, without consuming them (valid during this call only).
    @inlinable
    public var readableBytesView: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: buffer[readerIndex...])
    }
}

/// Writes one framed message inside `Codec.write(to:_:)`; valid only during that call.
/// Writing cannot fail except by running out of memory, which stops the program (as it
/// does for any Swift allocation).
public struct ByteWriter {
    @usableFromInline let writer: OpaquePointer

    @usableFromInline
    init(_ writer: OpaquePointer) {
        self.writer = writer
    }

    /// Appends raw bytes.
    @inlinable
    public mutating func writeBytes(_ buffer: UnsafeRawBufferPointer) {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let rc = knet_writer_write(writer, base, buffer.count)
        precondition(rc == 0, "knet_writer_write: out of memory")
    }

    /// Appends an array of bytes.
    @inlinable
    public mutating func writeBytes(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { writeBytes($0) }
    }

    /// Appends any sequence of bytes (without an extra copy when it is contiguous).
    @inlinable
    public mutating func writeBytes<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        let done: Void? = bytes.withContiguousStorageIfAvailable { writeBytes(UnsafeRawBufferPointer($0)) }
        if done == nil { writeBytes(Array(bytes)) }
    }

    /// Appends an integer (big-endian by default).
    @inlinable
    public mutating func writeInteger<T: FixedWidthInteger>(_ value: T, endianness: Endianness = .big) {
        let size = MemoryLayout<T>.size
        guard let dst = knet_writer_reserve(writer, size) else { preconditionFailure("knet_writer_reserve: out of memory") }
        let encoded = endianness == .big ? value.bigEndian : value.littleEndian
        dst.storeBytes(of: encoded, as: T.self)
    }
}

/// A codec the Swift layer hands to the C core as a C codec (no Swift call per message).
protocol BuiltinCCodec: Codec {
    /// The C codec and the object that keeps its configuration alive while it is used.
    func makeCCodec() -> (codec: knet_codec, owner: (any AnyObject & Sendable)?)
}

/// The raw stream codec: a message is whatever bytes are buffered (knet's DefaultCodec),
/// at most one read of about 64 KiB (Go's knet reads 4096 bytes at a time). Used through
/// the C core's own codec.
public struct DefaultCodec: Codec, BuiltinCCodec {
    /// Creates the raw stream codec.
    public init() {}

    /// Returns every buffered byte.
    public func read(from reader: inout ByteReader) throws -> [UInt8] { reader.readAll() }

    /// Writes the message unframed.
    public func write(to writer: inout ByteWriter, _ message: [UInt8]) throws { writer.writeBytes(message) }

    func makeCCodec() -> (codec: knet_codec, owner: (any AnyObject & Sendable)?) { (knet_default_codec, nil) }
}

/// 2-byte big-endian length prefix, frames up to 65535 bytes (knet's StdCodec).
/// Used through the C core's own codec.
public struct StdCodec: Codec, BuiltinCCodec {
    /// Creates the 2-byte length-prefix codec.
    public init() {}

    /// A whole frame: the 2-byte length and up to 65535 bytes.
    public var maxFrameSize: Int { 65_535 + 2 }

    /// Reads a 2-byte big-endian length, then that many bytes.
    public func read(from reader: inout ByteReader) throws -> [UInt8] {
        let length = try reader.readInteger(as: UInt16.self)
        return try reader.readBytes(Int(length))
    }

    /// Writes the 2-byte length, then the message; throws `KNetError.codec` above 65535 bytes.
    public func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        guard message.count <= Int(UInt16.max) else { throw KNetError.codec }
        writer.writeInteger(UInt16(message.count))
        writer.writeBytes(message)
    }

    func makeCCodec() -> (codec: knet_codec, owner: (any AnyObject & Sendable)?) { (knet_std_codec, nil) }
}

/// Heap storage for a `knet_length_field`, which the C codec reads for as long as it is
/// used (a server's or client's serving, and sends on connections kept past it).
final class LengthFieldStorage: @unchecked Sendable {
    // Written once in init, then only read (by any thread): safe to share.
    let field: UnsafeMutablePointer<knet_length_field>

    init(lengthBytes: Int, littleEndian: Bool, maxFrame: Int) {
        field = .allocate(capacity: 1)
        field.initialize(to: knet_length_field(length_bytes: UInt32(lengthBytes),
                                               little_endian: littleEndian,
                                               max_frame: UInt64(maxFrame)))
    }

    deinit {
        field.deinitialize(count: 1)
        field.deallocate()
    }
}

/// Length-prefixed frames: a 1, 2, 4 or 8-byte length in the given byte order, then the
/// body; bodies above `maxFrame` close the connection (or fail the send) with
/// `KNetError.codec`. Used through the C core's own codec.
public struct LengthFieldCodec: Codec, BuiltinCCodec {
    /// Bytes of the length prefix: 1, 2, 4 or 8.
    public let lengthBytes: Int
    /// Byte order of the length prefix.
    public let endianness: Endianness
    /// Largest body accepted or sent, as given (0 = 16 MiB); where the prefix expresses less
    /// (255 for 1 byte, 65,535 for 2), that smaller limit applies.
    public let maxFrame: Int
    let storage: LengthFieldStorage
    /// The largest whole frame as the C codec computes it: the prefix and `maxFrame` (or
    /// 16 MiB), within what the prefix can express. Taken once here, not per frame.
    private let cMaxFrame: UInt64

    /// Creates a length-prefix codec; `lengthBytes` must be 1, 2, 4 or 8 and `maxFrame`
    /// not negative (either mistake traps: it is a programming error, not input).
    public init(lengthBytes: Int = 4, endianness: Endianness = .big, maxFrame: Int = 0) {
        precondition([1, 2, 4, 8].contains(lengthBytes), "lengthBytes must be 1, 2, 4 or 8")
        precondition(maxFrame >= 0, "maxFrame must not be negative")
        self.lengthBytes = lengthBytes
        self.endianness = endianness
        self.maxFrame = maxFrame
        self.storage = LengthFieldStorage(lengthBytes: lengthBytes, littleEndian: endianness == .little,
                                          maxFrame: maxFrame)
        cMaxFrame = UInt64(UInt(bitPattern: Self.cCodec(storage).max_frame)) // a size_t
    }

    /// The body limit the C codec applies. (`maxFrame` is an Int: the sum does not saturate.)
    private var effectiveMaxFrame: UInt64 { cMaxFrame - UInt64(lengthBytes) }

    /// A whole frame: the length prefix and the largest body.
    public var maxFrameSize: Int { Int(clamping: cMaxFrame) }

    /// Reads the length prefix, then the body.
    public func read(from reader: inout ByteReader) throws -> [UInt8] {
        let length: UInt64
        switch lengthBytes {
        case 1: length = UInt64(try reader.readInteger(as: UInt8.self, endianness: endianness))
        case 2: length = UInt64(try reader.readInteger(as: UInt16.self, endianness: endianness))
        case 4: length = UInt64(try reader.readInteger(as: UInt32.self, endianness: endianness))
        default: length = try reader.readInteger(as: UInt64.self, endianness: endianness)
        }
        guard length <= effectiveMaxFrame else { throw KNetError.codec }
        return try reader.readBytes(Int(length))
    }

    /// Writes the length prefix, then the message; throws `KNetError.codec` when it does not fit.
    public func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        let length = UInt64(message.count)
        guard length <= effectiveMaxFrame else { throw KNetError.codec } // also fits the prefix
        switch lengthBytes {
        case 1: writer.writeInteger(UInt8(length), endianness: endianness)
        case 2: writer.writeInteger(UInt16(length), endianness: endianness)
        case 4: writer.writeInteger(UInt32(length), endianness: endianness)
        default:
            writer.writeInteger(length, endianness: endianness)
        }
        writer.writeBytes(message)
    }

    func makeCCodec() -> (codec: knet_codec, owner: (any AnyObject & Sendable)?) {
        (Self.cCodec(storage), storage)
    }

    /// The C length codec over `storage`'s field.
    private static func cCodec(_ storage: LengthFieldStorage) -> knet_codec {
        var codec = knet_codec()
        let rc = knet_length_codec(&codec, storage.field)
        precondition(rc == 0, "knet_length_codec rejected lengthBytes \(storage.field.pointee.length_bytes)")
        return codec
    }
}
